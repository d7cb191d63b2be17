"""The update kernels of :class:`polyak.EMA`: plans built once per binding, run every update.

Each group of tensors (one average buffer, one live device and dtype) is a list of segments
(:mod:`polyak._torch.segments`): single tensors, read afresh at every update, and runs of flat
weights, updated as one span.

``DirectGroup`` (live and average share dtype and device):
    one average: one ``torch._foreach_lerp_`` over the segments (a single ``lerp_`` when the
    model is one run). ``K`` averages: the segments are cut into column blocks of ``BLOCK``
    elements, and each block updates all ``K`` rows at once through a ``(K, 1, ...)`` weight
    tensor, so the live block comes from memory once and from cache ``K - 1`` times. The numbers
    are those of ``K`` separate lerps, bit for bit: ATen's lerp rounds a float32 weight tensor
    and a Python-float weight to the same float32.
``StagedGroup`` (dtype or device differ, e.g. a bf16 model with fp32 averages):
    the live pieces are cast into a fixed scratch buffer of ``CHUNK`` elements, batch by batch,
    and lerped from there in the average's dtype. Nothing is allocated per update and no cast
    copy of the model is made. (``avg*decay + (1-decay)*live`` through ``mul_``/``add_`` avoids
    the scratch on paper, but on CPU ``add_`` of a bf16 tensor into a float32 one allocates a cast
    copy of its input, and rounding ``decay`` to float32 biases the horizon: 1e-4 after 2000 steps
    at 0.9999 in our test, a thousand times the lerp's error.)

In every group a decay of exactly 1 leaves its average alone and a decay of 0 copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from polyak._torch.segments import Segment, build_segments, positions
from polyak._torch.storage import FlatStorage

__all__ = ["BLOCK", "CHUNK", "DirectGroup", "StagedGroup", "plan_groups"]

CHUNK = 1 << 19  # elements of staging scratch: 2 MiB in float32, half an L2 per thread here
BLOCK = 1 << 17  # elements per row in one block of a several-average update


def _lerp_rows(rows: Sequence[list[torch.Tensor]], src: list[torch.Tensor], decays) -> None:
    for row, decay in zip(rows, decays):
        if decay == 1.0:
            continue
        if decay == 0.0:
            torch._foreach_copy_(row, src)
        else:
            torch._foreach_lerp_(row, src, 1.0 - decay)


def _fusable(decays: Sequence[float]) -> bool:
    return len(decays) > 1 and all(0.0 < d < 1.0 for d in decays)


class _Weights:
    """``(K,)`` weights ``1 - decay`` on the averages' device, refreshed without allocating."""

    def __init__(self, k: int, like: torch.Tensor) -> None:
        dtype = like.dtype if like.dtype in (torch.float64, torch.float32) else torch.float32
        self.tensor = torch.zeros(k, dtype=dtype, device=like.device)
        self._items = list(self.tensor.unbind(0))
        self._last: tuple[float, ...] | None = None
        self._views: dict[int, torch.Tensor] = {}

    def set(self, decays: Sequence[float]) -> None:
        if decays != self._last:
            for item, d in zip(self._items, decays):
                item.fill_(1.0 - d)
            self._last = tuple(decays)

    def view(self, ndim: int) -> torch.Tensor:
        """Shaped ``(K, 1, ..., 1)`` to broadcast against a ``(K, *shape)`` block."""
        if ndim not in self._views:
            self._views[ndim] = self.tensor.view(-1, *([1] * (ndim - 1)))
        return self._views[ndim]


def _runs_apart(segments: list[Segment], compiled: bool) -> tuple[list[Segment], Any]:
    """Segments left for the eager kernels, and the runs given to the compiled kernel."""
    if not compiled:
        return segments, None
    from polyak._torch.compiled import CompiledRuns

    runs = [s for s in segments if not isinstance(s.live, int)]
    if not runs:
        return segments, None
    weights = _Weights(len(runs[0].rows), runs[0].rows[0])
    rest = [s for s in segments if isinstance(s.live, int)]
    return rest, CompiledRuns([(s.rows, s.live) for s in runs], weights)  # type: ignore[misc]


class DirectGroup:
    """Averages and live tensors of one (device, dtype): lerp straight from the live tensors."""

    def __init__(
        self, segments: list[Segment], block: int | None = None, compiled: bool = False
    ) -> None:
        block = BLOCK if block is None else block
        self.segments = segments
        self.k = len(segments[0].rows)
        order = [s for s in segments if isinstance(s.live, int)]
        order += [s for s in segments if not isinstance(s.live, int)]
        # every segment, one average at a time: for one average, and for decays 0 and 1
        self.fresh = [s.live for s in order if isinstance(s.live, int)]
        self.cached = [s.live for s in order if not isinstance(s.live, int)]
        self.rows = [[s.rows[k] for s in order] for k in range(self.k)]
        self.kernels = len(order)
        # several averages: runs to the compiled kernel, the rest in column blocks
        rest, self.compiled = _runs_apart(order, compiled and self.k > 1)
        blocks = [b for s in rest for b in s.split(block)]
        self.fused = self.k > 1 and all(b.stacked is not None for b in blocks)
        if self.fused:
            self.weights = _Weights(self.k, order[0].rows[0])
            self.block_avg = [b.stacked for b in blocks if b.stacked is not None]
            self.block_fresh = [(b.live, b.part) for b in blocks if isinstance(b.live, int)]
            self.block_cached = [b.live for b in blocks if not isinstance(b.live, int)]
            self.block_w = [self.weights.view(a.dim()) for a in self.block_avg]
            self.kernels = len(blocks) + len(self.compiled or ())

    def apply(self, lives: Sequence[torch.Tensor], decays: Sequence[float]) -> None:
        if self.fused and _fusable(decays):
            if self.compiled is not None:
                self.compiled.apply(decays)
            if self.block_avg:
                self.weights.set(decays)
                src = [
                    lives[i] if p is None else lives[i][p[0] : p[1]] for i, p in self.block_fresh
                ]
                torch._foreach_lerp_(self.block_avg, src + self.block_cached, self.block_w)
            return
        src = [lives[i] for i in self.fresh]
        _lerp_rows(self.rows, src + self.cached if self.cached else src, decays)


class StagedGroup:
    """Averages whose live tensors differ in dtype or device: lerp through a scratch buffer."""

    def __init__(
        self, segments: list[Segment], chunk: int | None = None, compiled: bool = False
    ) -> None:
        chunk = CHUNK if chunk is None else chunk
        self.segments = segments
        ref = segments[0].rows[0]
        self.k = len(segments[0].rows)
        same_device = all(isinstance(s.live, int) or s.live.device == ref.device for s in segments)
        rest, self.compiled = _runs_apart(segments, compiled and same_device)
        runs = [s for s in segments if s not in rest]
        pieces = [p for s in segments for p in s.split(chunk)]
        size = max([chunk, *(p.numel for p in pieces)])  # a piece that cannot be cut fits
        self.scratch = torch.empty(size, dtype=ref.dtype, device=ref.device)
        self.fused = self.k > 1 and all(p.stacked is not None for p in pieces)
        if self.fused:
            self.weights = _Weights(self.k, ref)
        # per batch: scratch views, sources, per-row avg views, stacked avg views, weights;
        # the runs' batches serve only when the compiled kernel cannot (decays 0 and 1)
        self.batches = self._batches([p for s in rest for p in s.split(chunk)], size)
        self.run_batches = self._batches([p for s in runs for p in s.split(chunk)], size)

    def _batches(self, pieces: list[Segment], size: int) -> list[tuple]:
        out: list[tuple] = []
        batch: list[Segment] = []
        used = 0
        for p in [*pieces, None]:
            if p is None or used + p.numel > size:
                if batch:
                    out.append(self._batch(batch))
                batch, used = [], 0
            if p is not None:
                batch.append(p)
                used += p.numel
        return out

    def _batch(self, batch: list[Segment]) -> tuple:
        scratch, offset = [], 0
        for p in batch:
            scratch.append(self.scratch[offset : offset + p.numel].view(p.rows[0].shape))
            offset += p.numel
        sources = [(p.live, p.part) for p in batch]
        rows = [[p.rows[k] for p in batch] for k in range(self.k)]
        stacked = [p.stacked for p in batch if p.stacked is not None] if self.fused else []
        w = [self.weights.view(a.dim()) for a in stacked] if self.fused else []
        return (scratch, sources, rows, stacked, w)

    @property
    def kernels(self) -> int:
        return sum(2 * len(b[0]) for b in self.batches) + len(self.compiled or ())

    def apply(self, lives: Sequence[torch.Tensor], decays: Sequence[float]) -> None:
        batches = self.batches
        if self.compiled is not None:
            if all(0.0 < d < 1.0 for d in decays):
                self.compiled.apply(decays)
            else:
                batches = batches + self.run_batches
        fused = self.fused and _fusable(decays)
        if fused:
            self.weights.set(decays)
        for scratch, sources, rows, stacked, w in batches:
            src = [
                x if not isinstance(x, int) else lives[x] if p is None else lives[x][p[0] : p[1]]
                for x, p in sources
            ]
            torch._foreach_copy_(scratch, src)
            if fused:
                torch._foreach_lerp_(stacked, scratch, w)
            else:
                _lerp_rows(rows, scratch, decays)


def plan_groups(
    storage: FlatStorage,
    members: Sequence[tuple[str, int]],
    lives: Sequence[torch.Tensor],
    *,
    copy: bool = False,
    rounded: Callable[[list[Segment]], Any] | None = None,
    compiled: bool = False,
) -> tuple[list[Any], list[int]]:
    """The kernels for ``members`` (``(name, live index)``) kept in ``storage``.

    One group per (average buffer, live device, live dtype). ``copy``: the tensors are only ever
    copied (``DirectGroup``, whose ``_foreach_copy_`` casts and moves as needed). ``rounded``
    builds the group of bf16 averages when stochastic rounding is on. ``compiled``: runs go to
    the kernel of :mod:`polyak._torch.compiled` where it helps (several averages, or a cast).

    Returns:
        the groups, and the live indices whose ``data_ptr`` cached spans depend on.
    """
    rank = positions(storage)
    by_key: dict[tuple, list[tuple[int, str, int]]] = {}
    for name, i in members:
        slot = storage.slots[name]
        t = lives[i]
        by_key.setdefault((slot.key, t.device, t.dtype), []).append((slot.offset, name, i))
    groups: list[Any] = []
    watched: list[int] = []
    for (akey, device, dtype), items in by_key.items():
        items.sort()
        adjacent = [
            m > 0 and rank[items[m][1]] == rank[items[m - 1][1]] + 1 for m in range(len(items))
        ]
        segments, w = build_segments(
            storage.buffers[akey],
            [o for o, _, _ in items],
            adjacent,
            lives,
            [i for _, _, i in items],
        )
        watched += w
        if rounded is not None and akey[1] == torch.bfloat16:
            groups.append(rounded(segments))
        elif copy or akey == (device, dtype):
            groups.append(DirectGroup(segments, compiled=compiled and not copy))
        else:
            groups.append(StagedGroup(segments, compiled=compiled))
    return groups, watched
