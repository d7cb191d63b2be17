"""Run the EMA update benchmark: ``python benchmarks/run.py [--quick] [--shapes ...]``.

The same as ``polyak bench``; see :mod:`polyak.bench` for what is measured. Results go to
``benchmarks/results/`` with the machine and versions in the file name.
"""

from __future__ import annotations

import argparse
import sys

from polyak.bench import add_arguments, config_from_args, run_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_bench(config_from_args(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
