"""BEMA's read-time correction for :class:`polyak.EMA`: ``EMA_t + alpha_t (live - anchor)``.

The anchors of the BEMA averages are extra rows of the averages' flat storage, after the ``K``
averages (row ``K + j`` for the ``j``-th BEMA average), so they follow everything the rows do:
the layout (one ``(K + A, N)`` buffer per device and dtype, shard-local under FSDP2), rebinding,
and the update, which copies the live weights into an anchor (decay 0) at the update that takes
it and leaves it alone (decay 1, no kernel) at every other. The correction is elementwise over
those flat rows: a read makes one buffer of the averages' layout, fills it with the live weights
and computes ``(live - anchor) * alpha + ema`` in place, in the averages' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from polyak._timeline import Timeline
from polyak._torch.binding import Binding
from polyak._torch.storage import FlatStorage

__all__ = ["Corrected", "anchor_row", "corrected", "follow"]


def anchor_row(timeline: Timeline, row: int) -> int | None:
    """The storage row of average ``row``'s anchor, or ``None`` for a plain average."""
    if row not in timeline.anchored:
        return None
    return len(timeline.names) + timeline.anchored.index(row)


class Corrected:
    """One buffer of the averages' layout holding a BEMA average's corrected weights."""

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self.storage = FlatStorage(binding.averages.averaged.specs, rows=1)
        self.key: tuple[int, int] | None = None  # (updates, live versions) when last computed

    @torch.no_grad()
    def fill(self, row: int, anchor: int, alpha: float) -> dict[str, torch.Tensor]:
        """Compute ``avg[row] + alpha (live - avg[anchor])``; ``{name: view}`` of every tracked
        tensor (copied tensors are the storage's own views)."""
        averages = self.binding.averages
        views = self.storage.views[0]
        pairs = [
            (views[e.name], t)
            for e, t in zip(self.binding.entries, self.binding.lives)
            if e.mode == "average"
        ]
        for dst, src in pairs:  # a cast and a move where the live tensor differs
            dst.copy_(src)
        for key, out in self.storage.buffers.items():
            rows = averages.averaged.buffers[key]
            out[0].sub_(rows[anchor]).mul_(alpha).add_(rows[row])
        return self.views()

    def views(self) -> dict[str, torch.Tensor]:
        """``{name: view}`` of every tracked tensor: this buffer's, and the copied tensors'
        own storage."""
        views, averages = self.storage.views[0], self.binding.averages
        copied = averages.copied.views[0]
        return {n: views[n] if n in views else copied[n] for n in averages.names}

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes


def corrected(binding: Binding, timeline: Timeline, row: int) -> dict[str, torch.Tensor] | None:
    """The corrected weights of average ``row`` in a new buffer, or ``None`` for a plain
    average (whose stored views are what reads give)."""
    anchor = anchor_row(timeline, row)
    if anchor is None:
        return None
    return Corrected(binding).fill(row, anchor, timeline.alpha(row))


def _versions(binding: Binding) -> int:
    return sum(t._version for t in binding.lives)


def follow(
    module: nn.Module, buffer: Corrected, timeline: Timeline, row: int
) -> Callable[[], None]:
    """Keep ``module`` (whose tensors are views of ``buffer``) equal to the corrected average:
    recompute it at a forward once the average or the live weights changed (a count of updates
    and the live tensors' version counters say so). Returns the function that recomputes it when
    due (``get_module`` calls it too)."""
    anchor = anchor_row(timeline, row)
    assert anchor is not None

    def refresh() -> None:
        key = (timeline.num_updates, _versions(buffer.binding))
        if buffer.key != key:
            buffer.fill(row, anchor, timeline.alpha(row))
            buffer.key = key

    module.register_forward_pre_hook(lambda *_: refresh())
    return refresh
