"""Averages reconstructed after training from a snapshot store (EDM2 post-hoc EMA, LAWA).

:func:`reconstruct_many` solves EDM2's least-squares problem for every target (any
``sigma_rel``, or a constant ``decay``) using the snapshots at or before ``step``, then streams
the snapshot files once for all targets (:mod:`polyak.posthoc.reader`). :func:`window_average`
averages the last ``k`` live snapshots (LAWA). Stores written by several ranks (FSDP2) are
reconstructed per rank (``rank=r``: that rank's shards) or gathered into full tensors on one
process (``rank=None``, no ``torch.distributed`` needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyak._horizon import integer
from polyak.posthoc.combine import combine
from polyak.posthoc.manifest import LIVE
from polyak.posthoc.plan import plan_for, solutions, sources, targets_from, until
from polyak.posthoc.profiles import Solution, Target
from polyak.posthoc.ranks import assemble, common_snapshots
from polyak.posthoc.reader import layout_of
from polyak.posthoc.reading import check_files, read_consistent
from polyak.posthoc.results import Reconstruction, Reconstructions
from polyak.posthoc.store import RankStore, SnapshotFile

__all__ = ["Reconstruction", "Reconstructions", "reconstruct", "reconstruct_many", "window_average"]


def _averaged(manifest: dict[str, Any]) -> set[str]:
    return {n for n, info in manifest["tensors"].items() if info["kind"] == "average"}


def _gathered(parts: list[list[Reconstruction]], ranks: list[RankStore]) -> list[Reconstruction]:
    """One result per target: the rank's own, or full tensors gathered from every rank."""
    if len(parts) == 1:
        return parts[0]
    out = []
    for first, full in zip(parts[0], assemble(parts, ranks)):
        rec = Reconstruction(full)
        rec.__dict__.update(first.__dict__, rank=None, shards=None)
        out.append(rec)
    return out


def reconstruct_many(
    directory: str | Path,
    sigma_rels: Sequence[float] = (),
    *,
    decays: Sequence[float] = (),
    gammas: Sequence[float] = (),
    step: int | None = None,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_bytes: int = 32 << 20,
) -> Reconstructions:
    """Reconstruct several averages at once, reading each snapshot file once for all of them.

    For each target, the snapshots ``(t_i, gamma_i)`` at or before ``step`` (with ``t_i > 0``)
    are combined with EDM2's normalised least-squares coefficients ``x`` (:func:`solve`):
    ``avg = sum_i x_i snapshot_i``. A ``decay`` target is the debiased constant-decay EMA
    (weight ``(1-d) d**(t-s) / (1-d**t)`` on step ``s``), which equals the copy-initialised EMA
    once ``d**t`` is negligible.

    Args:
        directory: the store written by :class:`~polyak.posthoc.PostHocEMA`.
        sigma_rels: EDM2 relative widths, each in ``(0, 12**-0.5)``.
        decays: constant decays per optimizer step, each in ``(0, 1)``.
        gammas: power exponents, each ``>= 0``.
        step: the step to reconstruct (default: the last snapshot's). Snapshots after it are
            not used; a step between snapshots has no data after the previous one (see ``fit``).
        rank: for a sharded store, one rank's shards; ``None`` gathers full tensors.
        dtype: dtype of the averaged tensors (float32 or float64).
        chunk_bytes: working memory of one step of the streamed combination.

    Returns:
        :class:`Reconstructions`: one :class:`Reconstruction` per target, keyed by its label
        (``"sigma_rel=0.08"``, ``"decay=0.9995"``; a number looks up a ``sigma_rel``), in the
        order ``sigma_rels``, ``gammas``, ``decays``. A target given twice is an error.

    Raises:
        StoreError: not a store, or an inconsistent one. ChecksumError: a file is corrupt or
            missing (named, with its step).

    Examples:
        >>> import tempfile, torch, polyak
        >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
        >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10)
        >>> for step in range(100):  # after each optimizer step
        ...     ph.update()
        >>> ph.close()  # waits for the last write
        >>> avgs = reconstruct_many(store, [0.05, 0.1, 0.2], decays=[0.97])
        >>> list(avgs)
        ['sigma_rel=0.05', 'sigma_rel=0.1', 'sigma_rel=0.2', 'decay=0.97']
        >>> model.load_state_dict(avgs[0.1])  # a number looks up a sigma_rel
        <All keys matched successfully>
        >>> all(a.fit < 0.1 for a in avgs.values())
        True

    References:
        Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
        CVPR 2024, Sec. 3.2.
    """
    targets = targets_from(sigma_rels, gammas, decays)
    _check_dtype(dtype)

    def read(path: Path, ranks: list[RankStore]) -> list[Reconstruction]:
        plans = [plan_for(r, step) for r in common_snapshots(ranks)]
        parts = []
        with check_files(f for p in plans for f in p.files) as pins:  # all open from now on
            for p in plans:
                solved = solutions(p, targets)
                weights = np.stack([s.coefficients for s in solved])
                tensors = combine(
                    p.files, weights, _averaged(p.rank.manifest), len(p.files) - 1,
                    layout_of(p.rank.manifest), dtype, chunk_bytes, pins,
                )  # fmt: skip
                parts.append(
                    [
                        _wrap(o, s.target.label, p.step, s, p.files, s.coefficients, p.rank)
                        for o, s in zip(tensors, solved)
                    ]
                )
        return _gathered(parts, [p.rank for p in plans])

    return Reconstructions(read_consistent(directory, rank, read))


def _check_dtype(dtype: object) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def _wrap(
    tensors: dict[str, torch.Tensor],
    label: str,
    step: int,
    solution: Solution | None,
    files: list[SnapshotFile],
    coefficients: np.ndarray,
    r: RankStore,
) -> Reconstruction:
    out = Reconstruction((n, tensors[n]) for n in r.manifest["tensors"])
    shards = {n: i["shard"] for n, i in r.manifest["tensors"].items() if i.get("shard")}
    out.__dict__.update(
        label=label,
        step=step,
        solution=solution,
        sources=[(f.step, f.key) for f in files],
        coefficients=coefficients,
        rank=r.rank,
        run_id=r.manifest["run_id"],
        shards=shards or None,
    )
    return out


def reconstruct(
    directory: str | Path,
    sigma_rel: float | None = None,
    *,
    decay: float | None = None,
    gamma: float | None = None,
    step: int | None = None,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Reconstruction:
    """Reconstruct one average (exactly one of ``sigma_rel``, ``decay``, ``gamma``).

    See :func:`reconstruct_many` (which reads the snapshots once for many targets).

    Examples:
        >>> import tempfile, torch, polyak
        >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
        >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10)
        >>> for step in range(100):  # after each optimizer step
        ...     ph.update()
        >>> ph.close()  # waits for the last write
        >>> avg = polyak.posthoc.reconstruct(store, sigma_rel=0.08, step=50)
        >>> avg.step, max(step for step, _ in avg.sources)
        (50, 50)
    """
    Target.make(sigma_rel, gamma=gamma, decay=decay)  # exactly one, valid
    (rec,) = reconstruct_many(
        directory,
        [] if sigma_rel is None else [sigma_rel],
        decays=[] if decay is None else [decay],
        gammas=[] if gamma is None else [gamma],
        step=step,
        rank=rank,
        dtype=dtype,
    ).values()
    return rec


def window_average(
    directory: str | Path,
    k: int,
    *,
    step: int | None = None,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Reconstruction:
    """LAWA: the plain mean of the last ``k`` live snapshots at or before ``step``.

    ``avg = (1/k) sum_{j=1..k} theta(s_j)`` over the ``k`` latest snapshot steps ``s_j``
    (Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest
    Weight Averaging", 2022; Sanyal et al. 2023). Needs a store written with
    ``PostHocEMA(..., keep_live=True)``.

    Examples:
        >>> import tempfile, torch, polyak
        >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
        >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10, keep_live=True)
        >>> for step in range(100):
        ...     ph.update()
        >>> ph.close()
        >>> lawa = polyak.posthoc.window_average(store, k=5)
        >>> lawa.label, [step for step, _ in lawa.sources]
        ('window=5', [60, 70, 80, 90, 100])
    """
    k = integer("k", k, 1)
    _check_dtype(dtype)

    def read(path: Path, ranks: list[RankStore]) -> Reconstruction:
        ranks = common_snapshots(ranks)
        plans = []
        for r in ranks:
            at, _, snaps = until(r, step)
            files, _ = sources(r, snaps, [LIVE])
            if len(files) < k:
                raise ValueError(
                    f"{path}: window of k={k} live snapshots at step {at}, but the store has "
                    f"{len(files)} (keep them with PostHocEMA(..., keep_live=True))"
                )
            plans.append((at, files[-k:]))
        parts = []
        weights = np.full((1, k), 1.0 / k)
        with check_files(f for _, files in plans for f in files) as pins:
            for r, (at, files) in zip(ranks, plans):
                (tensors,) = combine(
                    files, weights, _averaged(r.manifest), k - 1, layout_of(r.manifest), dtype,
                    pins=pins,
                )  # fmt: skip
                parts.append([_wrap(tensors, f"window={k}", at, None, files, weights[0], r)])
        return _gathered(parts, ranks)[0]

    return read_consistent(directory, rank, read)
