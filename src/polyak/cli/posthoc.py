"""``polyak posthoc``: reconstruct averages from a post-hoc EMA store, or list its snapshots.

``polyak posthoc DIR --sigma-rel 0.05 0.08 0.12 --out OUT`` rebuilds the average of each target
(EDM2 ``sigma_rel``, or a constant ``--decay``) from the snapshots a
:class:`polyak.PostHocEMA` wrote to ``DIR`` (:func:`polyak.posthoc.reconstruct_many`, each file
read once), writes one safetensors file per target to ``OUT`` (``sigma_rel=0.08.safetensors``,
float32, canonical tensor names, the target, step, fit and run id in its metadata) and a PNG of
each target's weight profile over training time next to the profile the snapshots achieve
(:func:`polyak.posthoc.weight_profiles`). ``--score MODULE:FUNCTION`` scores each target's
average with the user's function (``score(state_dict) -> float``, higher is better; the same
scorer as ``polyak merge --greedy-soup``, :mod:`polyak.cli.scorer`) and reports the best one.
``polyak posthoc DIR --list`` describes the store (:func:`polyak.posthoc.list_snapshots`;
``--verify`` also checks every file's CRC-32).

Everything that can be checked from the manifests (the store, the targets, ``--step``, the
output directory) is checked before any snapshot file is read; a corrupt file found while
reading is reported the same way (one line, exit status 2) and nothing is written: the outputs
are written to temporary files and renamed into place once all are complete
(:class:`polyak.files.Outputs`). A failure to write them (a full disk, an output that cannot be
replaced) is one line too, exit status 2: no output is replaced and no temporary file is left.

Example:
    >>> from polyak.cli import main
    >>> main(["posthoc", "/nonexistent", "--list"])
    2
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["PLOT", "add_arguments", "prepare"]

PLOT = "weight_profiles.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``polyak posthoc`` (no torch import: ``polyak --help`` stays fast)."""
    parser.add_argument("directory", metavar="DIR", help="the store PostHocEMA wrote")
    parser.add_argument(
        "--sigma-rel",
        type=float,
        nargs="+",
        default=[],
        metavar="S",
        help="EDM2 relative widths to reconstruct, each in (0, 0.2887)",
    )
    parser.add_argument(
        "--decay",
        type=float,
        nargs="+",
        default=[],
        metavar="D",
        help="constant per-step decays to reconstruct (the debiased EMA), each in (0, 1)",
    )
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="reconstruct the averages of this optimizer step from the snapshots up to it "
        "(default: the last snapshot's step)",
    )
    parser.add_argument("--out", default=None, help="output directory (created if missing)")
    parser.add_argument(
        "--score",
        default=None,
        metavar="MODULE:FUNCTION",
        help="score each target's average with FUNCTION(state_dict) -> float (higher is "
        "better), e.g. validation accuracy, and report the best; MODULE is importable from "
        "the current directory or a path to a .py file",
    )
    parser.add_argument(
        "--plot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"write {PLOT}: target vs achieved weight profiles (needs matplotlib)",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="describe the store (run, averages, snapshots, ignored files) instead",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="with --list: also check every file's size and CRC-32 (reads all of them); the "
        "exit status is 1 if one fails",
    )


def prepare(args: argparse.Namespace) -> Callable[[], int]:
    """Check everything the manifests can tell and return the run (its exit status).

    Raises:
        ValueError: a bad flag, not a store (``StoreError``), a target or step the store cannot
            serve, an output directory that cannot be written; ``ImportError``: torch,
            safetensors or matplotlib is missing.
    """
    targets = bool(args.sigma_rel or args.decay)
    if args.list:
        given = (("--sigma-rel/--decay", targets), ("--out", args.out), ("--score", args.score))
        extra = [f for f, present in given if present]
        if extra or args.step is not None:
            raise ValueError(f"--list shows the store; it takes no {', '.join(extra) or '--step'}")
    elif args.verify:
        raise ValueError("--verify goes with --list (a reconstruction checks every file it reads)")
    elif not targets:
        raise ValueError("give the averages to reconstruct (--sigma-rel S ..., --decay D ...)")
    elif args.out is None:
        raise ValueError("give the output directory: --out OUT")
    import safetensors  # noqa: F401 - missing, the error says how to install it

    from polyak import posthoc

    if args.list:
        posthoc.list_snapshots(args.directory)  # a store, readable (reads no snapshot file)
        return lambda: _list(args.directory, args.verify)
    for flag, values, make in (
        ("--sigma-rel", args.sigma_rel, posthoc.Target.make),
        ("--decay", args.decay, lambda v: posthoc.Target.make(decay=v)),
    ):
        if len(set(values)) != len(values):
            raise ValueError(f"{flag} values must be distinct, got {' '.join(map(str, values))}")
        for v in values:
            try:
                make(v)
            except ValueError as e:
                raise ValueError(f"{flag} {v}: {e}") from None
    if args.step is not None and args.step < 1:
        raise ValueError(f"--step must be >= 1, got {args.step}")
    if args.plot:
        import matplotlib  # noqa: F401 - missing, the error says how to install it
    score = None
    if args.score is not None:
        from polyak.cli.scorer import load_scorer

        score = load_scorer(args.score, "--score")
    with _caught() as caught:
        profiles = posthoc.weight_profiles(
            args.directory, args.sigma_rel, decays=args.decay, step=args.step
        )
    from polyak.cli.common import check_output_dir

    check_output_dir(args.out, "--out")
    return lambda: _reconstruct(args, profiles, caught, score)


@contextmanager
def _caught() -> Iterator[list[str]]:
    """The library's warnings (ignored files, magnified rounding) as messages, for one line
    each on stderr instead of Python's file-and-line format."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield found
    found += [str(w.message) for w in records]


def _warn(messages: list[str]) -> None:
    for m in dict.fromkeys(messages):  # once each, in order
        print(f"polyak posthoc: warning: {' '.join(m.split())}", file=sys.stderr)


def _list(directory: str, verify: bool) -> int:
    from polyak import posthoc

    listing = posthoc.list_snapshots(directory, verify=verify)
    print(listing)
    return 1 if any(s["problems"] for s in listing.snapshots) else 0


def _reconstruct(
    args: argparse.Namespace,
    profiles: list[Any],
    caught: list[str],
    score: Callable[[Any], Any] | None,
) -> int:
    from polyak import posthoc

    out = Path(args.out)
    with _caught() as more:
        recs = list(
            posthoc.reconstruct_many(
                args.directory, args.sigma_rel, decays=args.decay, step=args.step
            ).values()
        )
    _warn(caught + more)
    scores: dict[str, float] = {}
    if score is not None:
        from polyak.merge.soup import scored

        scores = {rec.label: scored(score, dict(rec), rec.label) for rec in recs}
    try:
        _write(args, out, recs, profiles, scores)
    except OSError as e:  # a full disk, an output that cannot be replaced: the user's to fix
        if getattr(args, "debug", False):
            raise
        message = f"cannot write the outputs to {out} ({e}); nothing was replaced"
        print(f"polyak posthoc: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    print(f"store {args.directory}: run {recs[0].run_id}, reconstructed at step {recs[0].step}")
    column = f" {'score':>10}" if scores else ""
    print(f"{'target':<22} {'fit':>8} {'sum |x|':>8}{column}  file")
    for rec in recs:
        assert rec.solution is not None
        name = out / f"{rec.label}.safetensors"
        value = f" {scores[rec.label]:>10.5g}" if scores else ""
        print(f"{rec.label:<22} {rec.fit:>8.1e} {rec.solution.amplification:>8.2f}{value}  {name}")
    if scores:
        best = max(scores, key=lambda label: scores[label])  # the first of equal scores
        print(f"best by {args.score}: {best} (score {scores[best]:.6g}): {out / best}.safetensors")
    if args.plot:
        print(f"weight profiles: {out / PLOT}")
    return 0


def _write(
    args: argparse.Namespace,
    out: Path,
    recs: list[Any],
    profiles: list[Any],
    scores: dict[str, float],
) -> None:
    """Every output staged to a temporary file, then all renamed into place together
    (:class:`polyak.files.Outputs`): on any failure none is replaced and none is left."""
    from safetensors.torch import save_file

    from polyak.files import Outputs

    store = str(Path(args.directory).resolve())
    with Outputs() as staged:
        for rec in recs:
            metadata = {"format": "polyak.posthoc.reconstruction", "target": rec.label}
            metadata.update(step=str(rec.step), fit=f"{rec.fit:.6g}", run_id=rec.run_id)
            metadata.update(store=store)
            if rec.label in scores:
                metadata.update(score=f"{scores[rec.label]:.9g}", scorer=args.score)
            save_file(dict(rec), str(staged.stage(out / f"{rec.label}.safetensors")), metadata)
        if args.plot:
            _plot(profiles, staged.stage(out / PLOT), recs[0].run_id)
        staged.commit()


def _plot(profiles: list[Any], path: Path, run_id: str) -> None:
    """One panel per target: its weight profile and the one the snapshots achieve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(profiles)
    cols = min(n, 3)
    rows = -(-n // cols)
    legend = 0.45  # inches under the panels
    height = 3.1 * rows + 0.8 + legend
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, height), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, profiles):
        # weight per 1000 optimizer steps: readable numbers at any length of training
        ax.stairs(p.target * 1e3, p.edges, baseline=None, color="0.6", lw=3.5, label="target")
        ax.stairs(p.achieved * 1e3, p.edges, baseline=None, color="C0", lw=1.2,
                  label="achieved by the snapshots")  # fmt: skip
        times = sorted(set(p.solution.ts.tolist()))
        ax.plot(times, [0.03] * len(times), "|", color="C3", ms=7,
                transform=ax.get_xaxis_transform(), label="a snapshot")  # fmt: skip
        ax.set_title(f"{p.label} (fit {p.fit:.1e})", fontsize="medium")
        ax.set_xlabel("optimizer steps since averaging started")
        ax.set_ylabel("weight per 1000 steps")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(
        f"Post-hoc EMA: target vs achieved weight profiles at step {profiles[0].step}\n"
        f"(run {run_id}; fit = relative L2 distance between the two)"
    )
    fig.tight_layout(rect=(0, legend / height, 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
