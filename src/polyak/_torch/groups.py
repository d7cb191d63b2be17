"""Update groups: how one update moves the averages of a set of tensors, planned once per binding.

Every tracked tensor belongs to one group: one average buffer (device, dtype) and one live device
and dtype. A group holds the group's :mod:`~polyak._torch.segments` and implements :class:`Group`:
``apply(decays)`` runs the update of every average with ``decays[k]`` for average ``k``, and
``launches`` counts the kernels it starts.

``DirectGroup`` (live and average share dtype and device):
    one average: one ``torch._foreach_lerp_`` over the segments (a single ``lerp_`` when the
    model is one span). ``K`` averages: the segments are cut into column blocks of ``BLOCK``
    elements, and each block updates all ``K`` rows at once through a ``(K, 1, ...)`` weight
    tensor, so the live block comes from memory once and from cache ``K - 1`` times. The numbers
    are those of ``K`` separate lerps, bit for bit: ATen's lerp rounds a float32 weight tensor
    and a Python-float weight to the same float32.
``StagedGroup`` (dtype or device differ, e.g. a bf16 model with fp32 averages; or the
``nonfinite="skip"`` mode): the live pieces are cast into a fixed scratch buffer of ``CHUNK``
    elements, batch by batch, and lerped from there in the average's dtype. Nothing is allocated
    per update and no cast copy of the model is made. (``avg*decay + (1-decay)*live`` through
    ``mul_``/``add_`` avoids the scratch on paper, but on CPU ``add_`` of a bf16 tensor into a
    float32 one allocates a cast copy of its input, and rounding ``decay`` to float32 biases the
    horizon: 1e-4 after 2000 steps at 0.9999 in our test, a thousand times the lerp's error.)
``CopyGroup``: tensors that are copied, never averaged (integer buffers, ``buffers="copy"``).

In every group a decay of exactly 1 leaves its average alone (also where the live weights hold
``inf``/``nan``) and a decay of 0 copies.

Skipping non-finite updates without a host sync (:class:`Gate`): the staged groups replace
``inf``/``nan`` in their scratch by 0 (a no-op when the gate is open: every value is finite then)
and lerp with weights ``(1 - decay) * ok``, so a closed gate leaves every average exactly as it
was (``avg + 0 * (x - avg) == avg`` for a finite ``x``) and an open one computes the ordinary
update; ``ok`` never leaves the device. (``masked_fill_`` with the 0-d flag would do the same
but measured 5x slower than ``nan_to_num_`` here.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from polyak._torch.segments import Segment, build_segments
from polyak._torch.storage import FlatStorage

__all__ = [
    "BLOCK",
    "CHUNK",
    "CopyGroup",
    "DirectGroup",
    "Gate",
    "Group",
    "StagedGroup",
    "pack",
    "plan_groups",
]

CHUNK = 1 << 19  # elements of staging scratch: 2 MiB in float32, half an L2 per thread here
BLOCK = 1 << 17  # elements per row in one block of a several-average update


class Group(Protocol):
    """What every update strategy implements."""

    segments: list[Segment]

    @property
    def launches(self) -> int:
        """Kernels one :meth:`apply` starts (with every decay strictly between 0 and 1)."""
        ...

    def apply(self, decays: Sequence[float]) -> None:
        """Move average ``k`` of every segment towards its source with ``decays[k]``."""
        ...


class Gate:
    """Whether this update's live weights are all finite, as a flag on one device."""

    def __init__(self, device: torch.device) -> None:
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)

    def set(self, ok: torch.Tensor) -> None:
        self.ok.copy_(ok, non_blocking=True)
        torch.logical_not(self.ok, out=self.bad)


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
    """``(K,)`` weights ``1 - decay`` on the averages' device, refreshed without allocating;
    with a gate, multiplied by its flag at every update."""

    def __init__(self, k: int, like: torch.Tensor, gate: Gate | None = None) -> None:
        dtype = like.dtype if like.dtype in (torch.float64, torch.float32) else torch.float32
        self.tensor = torch.zeros(k, dtype=dtype, device=like.device)
        self.gate = gate
        self.base = self.tensor if gate is None else torch.zeros_like(self.tensor)
        self._items = list(self.base.unbind(0))
        self._last: tuple[float, ...] | None = None
        self._views: dict[int, torch.Tensor] = {}

    def set(self, decays: Sequence[float]) -> None:
        if decays != self._last:
            for item, d in zip(self._items, decays):
                item.fill_(1.0 - d)
            self._last = tuple(decays)
        if self.gate is not None:
            torch.mul(self.base, self.gate.ok, out=self.tensor)

    def view(self, ndim: int) -> torch.Tensor:
        """Shaped ``(K, 1, ..., 1)`` to broadcast against a ``(K, *shape)`` block."""
        if ndim not in self._views:
            self._views[ndim] = self.tensor.view(-1, *([1] * (ndim - 1)))
        return self._views[ndim]


def pack(pieces: Sequence[Segment], size: int) -> list[list[Segment]]:
    """Consecutive pieces in batches of at most ``size`` elements (a bigger piece alone)."""
    out: list[list[Segment]] = []
    used = 0
    for p in pieces:
        if not out or used + p.numel > size:
            out.append([])
            used = 0
        out[-1].append(p)
        used += p.numel
    return out


def _runs_apart(segments: list[Segment], compiled: bool) -> tuple[list[Segment], Any]:
    """Segments left for the eager kernels, and the spans given to the compiled kernel."""
    spans = [s for s in segments if s.span] if compiled else []
    if not spans:
        return segments, None
    from polyak._torch.compiled import CompiledRuns

    weights = _Weights(len(spans[0].rows), spans[0].rows[0])
    rest = [s for s in segments if not s.span]
    return rest, CompiledRuns([(s.rows, s.source) for s in spans], weights)


class DirectGroup:
    """Averages and live tensors of one (device, dtype): lerp straight from the live tensors."""

    def __init__(
        self, segments: list[Segment], block: int | None = None, compiled: bool = False
    ) -> None:
        block = BLOCK if block is None else block
        self.segments = segments
        self.k = len(segments[0].rows)
        # every segment, one average at a time: for one average, and for decays 0 and 1
        self.sources = [s.source for s in segments]
        self.rows = [[s.rows[k] for s in segments] for k in range(self.k)]
        self.launches = len(segments)
        # several averages: spans to the compiled kernel, the rest in column blocks
        rest, self.compiled = _runs_apart(segments, compiled and self.k > 1)
        blocks = [b for s in rest for b in s.split(block)]
        self.fused = self.k > 1 and all(b.stacked is not None for b in blocks)
        if self.fused:
            self.weights = _Weights(self.k, segments[0].rows[0])
            self.block_avg = [b.stacked for b in blocks if b.stacked is not None]
            self.block_src = blocks
            self.block_w = [self.weights.view(a.dim()) for a in self.block_avg]
            self.launches = len(blocks) + len(self.compiled or ())

    def apply(self, decays: Sequence[float]) -> None:
        if self.fused and _fusable(decays):
            if self.compiled is not None:
                self.compiled.apply(decays)
            if self.block_avg:
                self.weights.set(decays)
                src = [b.read() for b in self.block_src]
                torch._foreach_lerp_(self.block_avg, src, self.block_w)
            return
        _lerp_rows(self.rows, self.sources, decays)


class StagedGroup:
    """Averages whose live tensors differ in dtype or device, or gated updates: lerp through a
    scratch buffer."""

    def __init__(
        self,
        segments: list[Segment],
        chunk: int | None = None,
        compiled: bool = False,
        gate: Gate | None = None,
        scratch_dtype: torch.dtype | None = None,
    ) -> None:
        chunk = CHUNK if chunk is None else chunk
        self.segments = segments
        ref = segments[0].rows[0]
        self.k = len(segments[0].rows)
        self.gate = gate
        same_device = all(s.source.device == ref.device for s in segments)
        rest, self.compiled = _runs_apart(segments, compiled and same_device and gate is None)
        runs = [s for s in segments if s not in rest]
        pieces = [p for s in segments for p in s.split(chunk)]
        size = max([chunk, *(p.numel for p in pieces)])  # a piece that cannot be cut fits
        self.scratch = torch.empty(size, dtype=scratch_dtype or ref.dtype, device=ref.device)
        stackable = all(p.stacked is not None for p in pieces)
        if gate is not None and not stackable:  # rows of a FlatStorage always stack
            raise RuntimeError("a gated update needs the averages' rows in one buffer")
        self.fused = stackable and (gate is not None or self.k > 1)
        if self.fused:
            self.weights = _Weights(self.k, ref, gate)
        # the spans' batches serve only when the compiled kernel cannot (decays 0 and 1)
        self.batches = [
            self._batch(b) for b in pack([p for s in rest for p in s.split(chunk)], size)
        ]
        self.run_batches = [
            self._batch(b) for b in pack([p for s in runs for p in s.split(chunk)], size)
        ]

    def _batch(self, batch: list[Segment]) -> tuple:
        """Per batch: scratch views, pieces, per-row average views, stacked views, weights."""
        scratch, offset = [], 0
        for p in batch:
            scratch.append(self.scratch[offset : offset + p.numel].view(p.rows[0].shape))
            offset += p.numel
        rows = [[p.rows[k] for p in batch] for k in range(self.k)]
        stacked = [p.stacked for p in batch if p.stacked is not None] if self.fused else []
        w = [self.weights.view(a.dim()) for a in stacked] if self.fused else []
        return (scratch, batch, rows, stacked, w, self.scratch[:offset])

    @property
    def launches(self) -> int:
        return sum(2 * len(b[0]) for b in self.batches) + len(self.compiled or ())

    def _stage(self, scratch: list[torch.Tensor], batch: list[Segment], used: torch.Tensor) -> None:
        torch._foreach_copy_(scratch, [p.read() for p in batch])
        if self.gate is not None:  # finite values pass; a closed gate's inf/nan become 0
            torch.nan_to_num_(used, 0.0, 0.0, 0.0)

    def apply(self, decays: Sequence[float]) -> None:
        batches = self.batches
        if self.compiled is not None:
            if all(0.0 < d < 1.0 for d in decays):
                self.compiled.apply(decays)
            else:
                batches = batches + self.run_batches
        fused = self.gate is not None or (self.fused and _fusable(decays))
        if fused:
            self.weights.set(decays)
        for scratch, batch, rows, stacked, w, used in batches:
            self._stage(scratch, batch, used)
            if fused:
                torch._foreach_lerp_(stacked, scratch, w)
            else:
                _lerp_rows(rows, scratch, decays)


class CopyGroup:
    """Tensors that are copied from the model at every update; with a gate, only while it is
    open (floating tensors; integer ones cannot be non-finite)."""

    def __init__(self, segments: list[Segment], gate: Gate | None = None) -> None:
        self.segments = segments
        self.gate = gate
        self.dst = [s.rows[0] for s in segments]
        self.src = [s.source for s in segments]
        self.launches = len(segments)

    def apply(self, decays: Sequence[float]) -> None:
        if self.gate is None:
            torch._foreach_copy_(self.dst, self.src)
            return
        for d, s in zip(self.dst, self.src):
            if d.is_floating_point() or d.is_complex():
                d.copy_(torch.where(self.gate.ok, s.to(d.device, d.dtype), d))
            else:
                d.copy_(s)


def plan_groups(
    storage: FlatStorage,
    members: Sequence[tuple[str, torch.Tensor]],
    *,
    copy: bool = False,
    rounded: Callable[[list[Segment]], Group] | None = None,
    compiled: bool = False,
    gate: Callable[[torch.device], Gate] | None = None,
) -> list[Group]:
    """The groups for ``members`` (``(name, live tensor)``) kept in ``storage``.

    One group per (average buffer, live device, live dtype). ``copy``: the tensors are only ever
    copied. ``rounded`` builds the group of bf16 averages when stochastic rounding is on.
    ``compiled``: spans go to the kernel of :mod:`polyak._torch.compiled` where it helps
    (several averages, or a cast). ``gate`` gives the gate of a device in ``nonfinite="skip"``
    mode: every averaged group is then staged.
    """
    rank = storage.positions()
    by_key: dict[tuple, list[tuple[int, str, torch.Tensor]]] = {}
    for name, t in members:
        slot = storage.slots[name]
        by_key.setdefault((slot.key, t.device, t.dtype), []).append((slot.offset, name, t))
    groups: list[Group] = []
    for (akey, device, dtype), items in by_key.items():
        items.sort(key=lambda item: item[0])
        adjacent = [
            m > 0 and rank[items[m][1]] == rank[items[m - 1][1]] + 1 for m in range(len(items))
        ]
        segments = build_segments(
            storage.buffers[akey], [o for o, _, _ in items], adjacent, [t for _, _, t in items]
        )
        g = None if gate is None else gate(akey[0])
        if copy:
            groups.append(CopyGroup(segments, g))
        elif rounded is not None and akey[1] == torch.bfloat16:
            groups.append(rounded(segments))
        elif g is not None:
            groups.append(StagedGroup(segments, gate=g))
        elif akey == (device, dtype):
            groups.append(DirectGroup(segments, compiled=compiled))
        else:
            groups.append(StagedGroup(segments, compiled=compiled))
    return groups
