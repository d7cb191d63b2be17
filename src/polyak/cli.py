"""The ``polyak`` command line: thin shells over :func:`polyak.study.run.run_study` and the
benchmark. Every flag is a field of the function's config dataclass."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polyak", description="Weight averaging for networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    from polyak.study.config import add_arguments as study_arguments

    study = sub.add_parser(
        "study", help="measure on real data what averaging the weights buys",
        description="Train small networks with and without averaged weights on Fashion-MNIST "
        "(or digits) with and without label noise, and a regression task; write results.json, "
        "plots and report.md.",
    )  # fmt: skip
    study_arguments(study)
    try:
        from polyak import bench as bench_module
    except ImportError:  # pragma: no cover - torch missing
        bench_module = None  # type: ignore[assignment]
    if bench_module is not None and hasattr(bench_module, "add_arguments"):
        bench = sub.add_parser("bench", help="time EMA updates of polyak and its peers")
        bench_module.add_arguments(bench)

    args = parser.parse_args(argv)
    if args.command == "study":
        from polyak.study.config import config_from_args
        from polyak.study.run import run_study

        run_study(config_from_args(args))
        return 0
    assert bench_module is not None
    bench_module.run_bench(bench_module.config_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
