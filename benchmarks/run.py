"""Run the EMA update benchmark: ``python benchmarks/run.py [--quick] [--shapes ...]``.

The same as ``polyak bench`` (see ``polyak bench --help`` and :mod:`polyak.cli.bench` for what is
measured). Results go to ``benchmarks/results/`` with the machine and versions in the file name.
"""

from __future__ import annotations

import sys

from polyak.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
