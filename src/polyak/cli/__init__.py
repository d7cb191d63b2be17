"""The ``polyak`` command line (also ``python -m polyak``): ``polyak study``, ``polyak bench``,
``polyak posthoc`` and ``polyak merge``.

Thin shells over :func:`polyak.cli.study.run.run_study`, :func:`polyak.cli.bench.run_bench`
(every flag is a field of their config dataclass), :mod:`polyak.cli.posthoc` and
:mod:`polyak.cli.merge`. A mistake of
the user (a bad value, an unknown name, a missing or corrupt data directory or store, an output
directory that cannot be written, a missing optional dependency) is one line on stderr and exit
status 2,
found before any work starts (a corrupt snapshot file: when it is read, before anything is
written); ``--debug`` shows the traceback instead. Anything else is a bug and keeps its
traceback.

Example:
    >>> from polyak.cli import main
    >>> main(["study", "--epochs", "-3"])
    2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["main"]

# optional dependency (top-level module) -> the extra that installs it
_EXTRAS = {"torch": "torch", "safetensors": "torch", "sklearn": "study", "matplotlib": "study"}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``polyak study: error: ...``, and that
    takes no abbreviated flags (``--epoch`` is an error, not ``--epochs``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> _Parser:
    from polyak.cli.bench.config import add_arguments as bench_arguments
    from polyak.cli.merge import add_arguments as merge_arguments
    from polyak.cli.posthoc import add_arguments as posthoc_arguments
    from polyak.cli.study.config import add_arguments as study_arguments

    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error instead of one line",
    )
    parser = _Parser(
        prog="polyak",
        description="Weight averaging for neural networks: the study of what it buys, the "
        "benchmark of the update against its peers, and averages reconstructed after training "
        "from a post-hoc EMA store.",
        parents=[debug],
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{study,bench,posthoc,merge}"
    )
    study = sub.add_parser(
        "study",
        parents=[debug],
        help="measure on real data what averaging the weights buys",
        description="Train small networks with and without averaged weights on Fashion-MNIST "
        "(or scikit-learn's digits), with clean and with noisy labels, and on a regression "
        "task; write results.json, PNG plots and report.md to --out. The default protocol "
        "takes 30 s on 2 idle cores, up to 2 minutes on a busy machine. --task rul --data-dir "
        "DIR: remaining useful life on NASA's C-MAPSS turbofan files instead (FD001: a few "
        "minutes).",
    )
    study_arguments(study)
    bench = sub.add_parser(
        "bench",
        parents=[debug],
        help="time the EMA update of polyak and its peers on this machine",
        description="Time the EMA update of polyak and of each installed peer on several "
        "model shapes, in one process, interleaved, with caches flushed, against a lerp_ over "
        "one contiguous buffer (the memory roofline); check every average against float64; "
        "write a .json and a .md result named after the machine. The full run takes 5-10 "
        "minutes; --quick is a smoke run.",
    )
    bench_arguments(bench)
    posthoc = sub.add_parser(
        "posthoc",
        parents=[debug],
        help="reconstruct averages of any sigma_rel or decay from a PostHocEMA store",
        description="Reconstruct, from the snapshots polyak.PostHocEMA wrote to DIR, the "
        "average of each --sigma-rel (EDM2) and --decay: one float32 safetensors file each in "
        "--out, and a PNG of each target's weight profile over training time against the one "
        "the snapshots achieve. --list describes the store instead (--verify: and checks every "
        "file's CRC-32).",
    )
    posthoc_arguments(posthoc)
    merge = sub.add_parser(
        "merge",
        parents=[debug],
        help="average saved checkpoints (LAWA, EMA, power, WSM, greedy soup), streamed",
        description="Average checkpoints of any kind (Hugging Face folders, safetensors, torch "
        "and Lightning files, polyak EMA files, post-hoc stores) with weights given or derived "
        "from the run, one tensor span at a time, into --out in the Hugging Face layout "
        "(index and shards, loadable by from_pretrained). --dry-run prints the weights and "
        "plots them against the steps instead.",
    )
    merge_arguments(merge)
    return parser


def _missing(e: ImportError) -> str:
    root = (e.name or "").split(".")[0]
    extra = _EXTRAS.get(root)
    if extra is None:
        return str(e)
    return f'{root} is not installed; install it with: pip install "polyak[{extra}]"'


def _prepare(args: argparse.Namespace) -> Callable[[], object]:
    """Validate everything the command needs (config, data, output directory) and return the
    run itself; raises ``ValueError`` (data errors included) or ``ImportError``."""
    if args.command == "posthoc":
        from polyak.cli.posthoc import prepare

        return prepare(args)
    if args.command == "merge":
        from polyak.cli.merge import prepare as prepare_merge

        return prepare_merge(args)
    if args.command == "study":
        from polyak.cli.study.config import config_from_args

        config = config_from_args(args)
        config.resolved()  # a bad flag is found before torch is imported
        from polyak.cli.study.run import prepare_study, run_study

        plan = prepare_study(config)
        return lambda: run_study(plan)
    from polyak.cli.bench import config_from_args as bench_config
    from polyak.cli.bench import run_bench

    bench = bench_config(args)
    import torch  # noqa: F401  (missing, it fails here, before any work)

    from polyak.cli.common import check_output_dir

    if bench.output_dir is not None:
        check_output_dir(bench.output_dir, "--output-dir")
    return lambda: run_bench(bench)


def _run_errors(command: str) -> tuple[type[Exception], ...]:
    """The user errors a command can only find while it runs: a corrupt snapshot file or
    checkpoint, a non-finite tensor in a merge, a scorer that fails, a learning rate so large
    that training diverges."""
    if command in ("posthoc", "merge"):
        from polyak.errors import CheckpointError, NonFiniteError
        from polyak.merge import ScoreError

        return (CheckpointError, NonFiniteError, ScoreError)
    if command == "study":
        from polyak.cli.study.config import TrainingDiverged

        return (TrainingDiverged,)
    return ()


def main(argv: list[str] | None = None) -> int:
    """Run ``polyak`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        run = _prepare(args)
    except (ValueError, ImportError) as e:
        if debug:
            raise
        return _error(args.command, e)
    try:
        status = run()
    except _run_errors(args.command) as e:
        if debug:
            raise
        return _error(args.command, e)
    return status if isinstance(status, int) else 0


def _error(command: str, e: Exception) -> int:
    message = _missing(e) if isinstance(e, ImportError) else str(e)
    print(f"polyak {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
