"""Which snapshots a reconstruction combines, and with which coefficients (manifest only).

:func:`plan_for` takes the snapshots of the stored averages up to the step asked for from one
rank's (validated) manifest: a step after the last snapshot is an error naming the steps held,
never the last snapshot's average under a later label. :func:`solutions` solves EDM2's
least-squares problem for each target (:mod:`polyak.posthoc.profiles`). The files themselves
are checked (:func:`polyak.posthoc.reading.check_files`) before the problem is built, so its size
is bounded by the files on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from polyak._horizon import integer
from polyak._warn import warn
from polyak.posthoc.profiles import Solution, Target, profile_sigma_rel, solve
from polyak.posthoc.reading import check_files
from polyak.posthoc.store import RankStore, SnapshotFile, StoreError

__all__ = ["Plan", "plan_for", "solutions", "solutions_for", "sources", "targets_from", "until"]

_ROUNDING = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # half an ulp, relative
POOR_FIT = 0.1
"""A profile fit above this warns: the reconstruction is visibly not the target's average (the
study's constant decays, fitted to 5-9%, scored within 0.12 points of the averages kept)."""


def _steps_text(snaps: list[dict[str, Any]]) -> str:
    steps = [s["step"] for s in snaps]
    shown = ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, ..., {steps[-1]}"
    return f"{len(steps)} snapshot(s), at steps {shown}"


def until(r: RankStore, step: int | None) -> tuple[int, int, list[dict[str, Any]]]:
    """``(step, t, snapshots)``: the step asked for, its time, and the snapshots up to it.

    Raises:
        ValueError: a step before the first snapshot or after the last (naming the steps the
            store holds: a later step is never answered with the last snapshot's average).
    """
    snaps = r.manifest["snapshots"]
    if not snaps:
        raise StoreError(f"{r.path}: the store holds no snapshots yet")
    if step is None:
        last = snaps[-1]
        return last["step"], last["t"], snaps
    step = integer("step", step, 1)
    if step > snaps[-1]["step"]:
        raise ValueError(
            f"step {step} is after the last snapshot: {r.path.parent} holds "
            f"{_steps_text(snaps)}; pass a step up to {snaps[-1]['step']} (or none, for the last)"
        )
    used = [s for s in snaps if s["step"] <= step]
    if not used:
        raise ValueError(
            f"no snapshot at or before step {step} (the first is {snaps[0]['step']}): "
            f"{r.path.parent} holds {_steps_text(snaps)}"
        )
    exact = [s["t"] for s in used if s["step"] == step]
    return step, exact[0] if exact else step - r.manifest["start_step"], used


def sources(
    r: RankStore, snaps: list[dict[str, Any]], keys: Sequence[str]
) -> tuple[list[SnapshotFile], list[dict[str, Any]]]:
    """The files of ``keys`` in ``snaps``, and the snapshot of each."""
    files, used = [], []
    for s in snaps:
        entries = r.files(s)
        for key in keys:
            if key in entries:
                files.append(entries[key])
                used.append(s)
    return files, used


@dataclass(frozen=True)
class Plan:
    """What one rank's manifest gives for a step: the step, its time, the files to combine
    and the time of each."""

    rank: RankStore
    step: int
    t: int
    files: list[SnapshotFile]
    ts: list[int]


def plan_for(r: RankStore, step: int | None) -> Plan:
    """The snapshots of the averages (``t > 0``) up to ``step`` in one rank's manifest."""
    at, t, snaps = until(r, step)
    keys = sorted(r.manifest["averages"])
    files, used = sources(r, [s for s in snaps if s["t"] > 0], keys)
    if not files:
        raise ValueError(f"{r.path}: no snapshot of an average at or before step {at}")
    return Plan(r, at, t, files, [s["t"] for s in used])


def solutions(plan: Plan, targets: Sequence[Target]) -> list[Solution]:
    """One least-squares solution per target (:func:`~polyak.posthoc.profiles.solve`); a
    warning (pointing at the caller's line) when the coefficients magnify low-precision
    snapshots' rounding, and when the fit is poor (above :data:`POOR_FIT`: the warning gives
    the fit and what would improve it)."""
    manifest = plan.rank.manifest
    gammas = [manifest["averages"][f.key]["gamma"] for f in plan.files]
    solutions = [solve(plan.ts, gammas, plan.t, target) for target in targets]
    rounding = _ROUNDING.get(manifest["snapshot_dtype"])
    for s in solutions:
        if rounding and s.amplification > 10:
            warn(
                f"{s.target.label}: the snapshots' coefficients add up to {s.amplification:.0f} "
                f"in absolute value, which magnifies their {manifest['snapshot_dtype']} rounding "
                f"(up to {rounding:.0e} of each weight) to up to {rounding * s.amplification:.0e}; "
                "targets narrower than the narrowest stored average need float32 snapshots or "
                "a narrower average (sigma_rels=...)"
            )
        if s.fit > POOR_FIT:
            warn(
                f"{s.target.label}: the snapshots fit its weight profile only to {s.fit:.2f} "
                "(relative L2 distance between the profile they achieve and the target's; "
                f"0 is exact, above {POOR_FIT:g} the average differs visibly from the "
                f"target's); {_improve(s, plan)}"
            )
    return solutions


def _improve(s: Solution, plan: Plan) -> str:
    """What would fit ``s.target`` better, from the target's width and the snapshots held."""
    averages = plan.rank.manifest["averages"]
    kept = sorted(a["sigma_rel"] for a in averages.values())
    shown = ", ".join(f"{k:g}" for k in kept)
    width = profile_sigma_rel(s.target, s.t)
    if s.t > max(plan.ts):
        return (
            f"the step asked for (t={s.t:g}) is after the last snapshot used (t="
            f"{max(plan.ts):g}), and the steps in between are in no snapshot: reconstruct the "
            "step of a snapshot"
        )
    if width < kept[0] * 0.9:
        return (
            f"its profile (sigma_rel {width:.3g}) is narrower than the narrowest average kept "
            f"(sigma_rel {shown}): keep a narrower one too, e.g. PostHocEMA(sigma_rels="
            f"({width:.2g}, {shown}))"
        )
    if width > kept[-1] * 1.1:
        return (
            f"its profile (sigma_rel {width:.3g}) is wider than the widest average kept "
            f"(sigma_rel {shown}): keep a wider one too, e.g. PostHocEMA(sigma_rels=({shown}, "
            f"{min(width, 0.28):.2g}))"
        )
    return (
        f"{len(set(plan.ts))} snapshot steps of averages of sigma_rel {shown} are too few for "
        "its shape: more snapshots (a smaller snapshot_every) fit it more closely"
    )


def solutions_for(
    r: RankStore, step: int | None, targets: Sequence[Target]
) -> tuple[int, list[SnapshotFile], list[Solution]]:
    """The step, the snapshot files and one solution per target, from one rank's manifest.

    The files are checked (:func:`~polyak.posthoc.reading.check_files`: regular files inside the
    store, of the recorded sizes) before the least-squares problem is built, so its size is
    bounded by the files on disk, not by the manifest alone.
    """
    plan = plan_for(r, step)
    check_files(plan.files).close()
    return plan.step, plan.files, solutions(plan, targets)


def targets_from(
    sigma_rels: Sequence[float], gammas: Sequence[float], decays: Sequence[float]
) -> list[Target]:
    """The targets in the order the results come in: sigma_rels, gammas, decays."""
    targets = [Target.make(s) for s in sigma_rels]
    targets += [Target.make(gamma=g) for g in gammas]
    targets += [Target.make(decay=d) for d in decays]
    if not targets:
        raise ValueError("give at least one target: sigma_rels, gammas or decays")
    labels = [t.label for t in targets]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"the targets {twice} are given twice; give each once")
    return targets
