"""``polyak merge``: a weighted average of saved checkpoints, written in the Hugging Face layout.

``polyak merge CKPT... --lawa 4 --out DIR`` averages checkpoints of any kind
(:func:`polyak.merge.open_sources`: Hugging Face folders, safetensors, torch and Lightning
files, polyak EMA files and post-hoc stores) with weights given (``--weights``) or derived from
the run: LAWA (``--lawa K``), an EMA (``--ema DECAY``), EDM2's power average
(``--sigma-rel S``), WSM's learning-rate decay (``--wsm SHAPE:WINDOW``), or chosen by a score
(``--greedy-soup MODULE:FUNCTION``, :mod:`polyak.cli.scorer`). ``--dry-run`` prints the weight
of each checkpoint and writes a PNG of weight against step (``OUT/merge_weights.png``) instead.

Everything the headers can tell is checked before any tensor is read: the flags, the
checkpoints (kinds, tensor names and shapes, steps), the weights and the output folder. A
mistake is one line on stderr and exit status 2; so is a non-finite tensor or a scorer failing
while the merge runs (nothing is written then), and a failure to write the outputs.

Example:
    >>> from polyak.cli import main
    >>> main(["merge", "/nonexistent", "--lawa", "2", "--out", "/tmp/x"])
    2
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PLOT", "add_arguments", "prepare"]

PLOT = "merge_weights.png"
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?B?)", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
          "T": 1e12, "TB": 1e12}  # fmt: skip
_SHAPES = ("linear", "cosine", "1-sqrt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``polyak merge`` (no torch import: ``polyak --help`` stays fast)."""
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="checkpoints (taken in the order of the steps they carry, else as given; "
        "--weights go with them in the order given): Hugging Face folders (checkpoint-N), "
        ".safetensors, "
        ".pt/.bin, Lightning .ckpt, polyak EMA files (FILE::NAME for one of several "
        "averages), post-hoc stores (DIR: live snapshots; DIR::sigma_rel=S: an average's)",
    )
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--weights",
        type=float,
        nargs="+",
        metavar="W",
        help="one weight per checkpoint (normalised to sum to 1)",
    )
    how.add_argument("--lawa", type=int, metavar="K", help="the mean of the last K checkpoints")
    how.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help="the EMA of this per-step decay at the last checkpoint",
    )
    how.add_argument(
        "--sigma-rel",
        type=float,
        metavar="S",
        help="EDM2's power average of this sigma_rel at the last checkpoint",
    )
    how.add_argument(
        "--wsm",
        metavar="SHAPE:WINDOW",
        help="WSM: stand for a learning-rate decay over the last WINDOW steps, "
        f"SHAPE one of {', '.join(_SHAPES)} (e.g. linear:2000)",
    )
    how.add_argument(
        "--greedy-soup",
        metavar="MODULE:FUNCTION",
        help="a greedy soup under FUNCTION(state_dict) -> float (higher is "
        "better); MODULE importable from here, or a .py file",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="output dtype of the floating tensors (default: as stored)",
    )
    parser.add_argument(
        "--accumulate",
        choices=["fp32", "fp64"],
        default="fp32",
        help="precision of the weighted sum (default: fp32)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        metavar="N",
        default=None,
        help="the step of each checkpoint, for those that do not carry one",
    )
    parser.add_argument(
        "--start",
        type=int,
        default=0,
        help="with --ema/--sigma-rel: the step where averaging began (default 0)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest output shard, e.g. 2GB or 500MB (default: 5GB)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"print each checkpoint's weight and write OUT/{PLOT}; merge nothing",
    )


def _size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if m is None or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text}: give a size such as 5GB, 500MB or 100000")
    return max(1, int(float(m.group(1)) * _UNITS[m.group(2).upper()]))


def _wsm(text: str) -> tuple[str, int]:
    shape, sep, window = text.rpartition(":")
    if not sep or shape not in _SHAPES or not window.isdecimal() or int(window) < 1:
        raise ValueError(
            f"--wsm {text}: give SHAPE:WINDOW, SHAPE one of {', '.join(_SHAPES)} and WINDOW "
            "the decay's length in steps (e.g. linear:2000)"
        )
    return shape, int(window)


def _weights(args: argparse.Namespace, sources: list[Any]) -> Any:
    from polyak.merge import weights

    if args.weights is not None:
        return weights.explicit(args.weights)
    steps = [s.step for s in sources]
    if args.lawa is not None:
        return weights.lawa(len(steps) if None in steps else steps, args.lawa)
    missing = [s.name for s in sources if s.step is None]
    if missing:
        raise ValueError(
            f"{missing[0]} carries no step ({len(missing)} of {len(sources)} checkpoints do "
            "not): give --steps N... (one per checkpoint)"
        )
    gammas = [s.gamma for s in sources]
    snapshots = None if all(g is None for g in gammas) else gammas
    if snapshots is not None and None in gammas:
        raise ValueError(
            "a merge with --ema or --sigma-rel cannot mix live checkpoints and snapshots of "
            "averages (a post-hoc store's DIR::averages): give one kind"
        )
    if args.ema is not None:
        return weights.ema(steps, args.ema, start=args.start, gammas=snapshots)
    if args.sigma_rel is not None:
        return weights.power(steps, args.sigma_rel, start=args.start, gammas=snapshots)
    shape, window = _wsm(args.wsm)
    return weights.wsm(steps, shape, window=window)  # type: ignore[arg-type]


def prepare(args: argparse.Namespace) -> Callable[[], int]:
    """Check everything the headers can tell and return the run (its exit status).

    Raises:
        ValueError: a bad flag, an unreadable or inconsistent checkpoint (``CheckpointError``),
            weights that cannot be derived, an output folder that cannot be written or holds an
            input; ``ImportError``: torch, safetensors or matplotlib is missing.
    """
    if args.dry_run and args.greedy_soup:
        raise ValueError("--dry-run prints weights fixed in advance; a greedy soup's come from "
                         "scoring")  # fmt: skip
    if args.wsm is not None:
        _wsm(args.wsm)
    shard = _size(args.max_shard_size)
    if args.start < 0:
        raise ValueError(f"--start must be >= 0, got {args.start}")
    if args.start and args.ema is None and args.sigma_rel is None:
        raise ValueError("--start goes with --ema or --sigma-rel")
    import safetensors  # noqa: F401 - missing, the error says how to install it
    import torch

    if args.dry_run:
        import matplotlib  # noqa: F401 - missing, the error says how to install it
    from polyak import merge as pm
    from polyak.cli.common import check_output_dir

    score = None
    if args.greedy_soup is not None:
        from polyak.cli.scorer import load_scorer

        score = load_scorer(args.greedy_soup, "--greedy-soup")
    dtype = None if args.dtype is None else getattr(torch, _DTYPES[args.dtype])
    accumulate = torch.float64 if args.accumulate == "fp64" else torch.float32
    sources = pm.open_sources(args.checkpoints, args.steps)
    if args.steps is None and None not in [s.step for s in sources]:
        # in step order (a shell glob puts checkpoint-1000 before checkpoint-200), each given
        # weight staying with its checkpoint
        order = sorted(range(len(sources)), key=lambda i: int(sources[i].step or 0))
        sources = [sources[i] for i in order]
        if args.weights is not None and len(args.weights) == len(order):
            args.weights = [args.weights[i] for i in order]
    try:
        w = [1.0] * len(sources) if score is not None else _weights(args, sources)
        check_output_dir(args.out, "--out")
        plan = pm.prepare(sources, w, args.out, dtype, accumulate=accumulate,
                          max_shard_bytes=shard)  # fmt: skip
    except BaseException:
        for s in sources:
            s.close()
        raise
    if score is not None:
        for s in sources:
            s.close()
        return lambda: _soup(args, score, dtype)
    return lambda: _run(args, plan)


def _table(plan: Any) -> list[str]:
    w = plan.weights
    fit = "" if w.fit is None else f", fit {w.fit:.2g} (largest gap between cumulative weights)"
    lines = [f"{len(plan.sources)} checkpoints, weights {w.label}{fit}",
             f"{'step':>10}  {'weight':>8}  checkpoint"]  # fmt: skip
    for s, x in zip(plan.sources, w.values):
        lines.append(f"{'-' if s.step is None else s.step:>10}  {x:>8.4f}  {s.name}")
    return lines


def _run(args: argparse.Namespace, plan: Any) -> int:
    try:
        if args.dry_run:
            print("\n".join(_table(plan)))
            _write_plot(plan, Path(args.out) / PLOT)
            print(f"weights against step: {Path(args.out) / PLOT}")
            return 0
        try:
            result = plan.run()
        except OSError as e:
            return _write_failed(args, e)
        print("\n".join(_table(plan)))
        print(
            f"merged {len(result.averaged)} tensors, copied {len(result.copied)} (integer) from "
            f"the latest; {result.nbytes / 1e6:.1f} MB in {len(result.files)} files: {args.out}"
        )
        return 0
    finally:
        for s in plan.sources:
            s.close()


def _soup(args: argparse.Namespace, score: Callable[[Any], Any], dtype: Any) -> int:
    from polyak.merge import greedy_soup

    try:
        soup = greedy_soup(args.checkpoints, score, args.out, dtype=dtype)
    except OSError as e:
        return _write_failed(args, e)
    print("ingredients by their own score:")
    for name, value in sorted(soup.scores.items(), key=lambda kv: -kv[1]):
        print(f"  {value:>12.6g}  {name}")
    print(f"soup started with {soup.kept[0]}")
    for name, value, kept in soup.trace:
        print(f"  {'kept' if kept else 'left':>5}  soup score with it {value:.6g}  {name}")
    print(f"soup of {len(soup.kept)}: score {soup.soup_score:.6g}; written to {args.out}")
    return 0


def _write_failed(args: argparse.Namespace, e: OSError) -> int:
    if getattr(args, "debug", False):
        raise e
    message = f"cannot write the merge to {args.out} ({e}); nothing was replaced"
    print(f"polyak merge: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _write_plot(plan: Any, path: Path) -> None:
    """Each checkpoint's weight at its step (or its position), staged and renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polyak.files import Outputs

    w = plan.weights
    steps = [s.step for s in plan.sources]
    known = None not in steps
    x = steps if known else list(range(1, len(steps) + 1))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.vlines(x, 0, w.values, color="C0", lw=2)
    ax.plot(x, w.values, "o", color="C0", label="weight of each checkpoint in the merge")
    ax.set_xlabel(
        "optimizer step of the checkpoint" if known else "checkpoint (in the order given)"
    )
    ax.set_ylabel("merge weight (the weights sum to 1)")
    fit = "" if w.fit is None else f"; fit {w.fit:.2g}"
    ax.set_title(f"polyak merge: {w.label}, {len(x)} checkpoints{fit}", fontsize="medium")
    ax.set_ylim(0, max(float(w.values.max()) * 1.15, 1e-9))
    ax.grid(alpha=0.3)
    fig.legend(loc="lower center", frameon=False)  # under the axes: never over a checkpoint
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with Outputs() as staged:
        fig.savefig(staged.stage(path), dpi=110, format="png")
        staged.commit()
    plt.close(fig)
