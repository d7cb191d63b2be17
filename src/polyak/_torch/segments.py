"""Segments: one tensor's (or one run's) views in each average, paired with what it reads.

A segment reads either a model tensor itself (the parameter or buffer object, so that a new
``.data`` is read at the next update; a piece of it is sliced at each update, never cached, so
that no view keeps an old storage alive) or a *span*: a run of tensors that sit next to each
other in the average's buffer and whose live tensors are contiguous views of one storage with the
same layout (what ``flat_params=True`` makes of a model, :mod:`polyak._torch.flat_params`). A
span is updated as one tensor: one kernel instead of one per tensor. The update strategies are
in :mod:`polyak._torch.groups`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Segment", "build_segments", "joins", "stack_rows"]


def stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The ``(K, *shape)`` view with rows ``rows``, if they are evenly spaced in one storage."""
    first = rows[0]
    if len(rows) == 1:
        return first.unsqueeze(0)
    step = rows[1].storage_offset() - first.storage_offset()
    for k, r in enumerate(rows):
        if (
            r.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or r.shape != first.shape
            or r.stride() != first.stride()
            or r.storage_offset() != first.storage_offset() + k * step
        ):
            return None
    return first.as_strided((len(rows), *first.shape), (step, *first.stride()))


class Segment:
    """``rows``: the segment's view in each average; ``source``: the model tensor or the span it
    reads; ``part``: a ``(start, stop)`` slice along dim 0 of a model tensor, or ``None``;
    ``span``: the source is a cached span of flat weights."""

    __slots__ = ("part", "rows", "source", "span", "stacked")

    def __init__(
        self,
        rows: list[torch.Tensor],
        source: torch.Tensor,
        part: tuple[int, int] | None = None,
        span: bool = False,
    ) -> None:
        self.rows = rows
        self.source = source
        self.part = part
        self.span = span
        self.stacked = stack_rows(rows)

    @property
    def numel(self) -> int:
        return self.rows[0].numel()

    def read(self) -> torch.Tensor:
        """What this segment's averages move towards, now."""
        if self.part is None:
            return self.source
        return self.source[self.part[0] : self.part[1]]

    def split(self, size: int) -> list[Segment]:
        """Pieces of at most ``size`` elements per row (one piece if it cannot be cut)."""
        n = self.numel
        if n <= size:
            return [self]
        if self.span:  # a flat span: cut anywhere, and keep the cut (it reads our own buffer)
            return [
                Segment([r[a : a + size] for r in self.rows], self.source[a : a + size], span=True)
                for a in range(0, n, size)
            ]
        shape = self.rows[0].shape
        if len(shape) == 0 or shape[0] < 2:
            return [self]
        step = max(1, size // (n // shape[0]))  # along dim 0: valid for any live strides
        start = 0 if self.part is None else self.part[0]
        out = []
        for a in range(0, shape[0], step):
            b = min(a + step, shape[0])
            out.append(Segment([r[a:b] for r in self.rows], self.source, (start + a, start + b)))
        return out


def _plain(t: torch.Tensor) -> bool:
    return type(t.data) is torch.Tensor and t.layout == torch.strided and t.is_contiguous()


def joins(first: torch.Tensor, first_off: int, t: torch.Tensor, off: int) -> bool:
    """``t`` continues a run that starts with ``first``, laid out as in the average's buffer."""
    if not (_plain(first) and _plain(t)) or first.dtype != t.dtype or first.device != t.device:
        return False
    if t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
        return False
    if t.storage_offset() - first.storage_offset() != off - first_off:
        return False
    return t.storage_offset() + t.numel() <= t.untyped_storage().nbytes() // t.element_size()


def build_segments(
    buffer: torch.Tensor,
    offsets: Sequence[int],
    adjacent: Sequence[bool],
    lives: Sequence[torch.Tensor],
) -> list[Segment]:
    """Segments of one group, joining neighbours whose live tensors are laid out like the average.

    Args:
        buffer: the ``(K, N)`` storage buffer holding the group's averages.
        offsets: element offset of each member in ``buffer``, ascending.
        adjacent: ``adjacent[m]``: member ``m`` directly follows member ``m - 1`` in ``buffer``
            (nothing but padding between them).
        lives: member ``m``'s live tensor is ``lives[m]``.
    """
    segments: list[Segment] = []
    run: list[int] = []
    k = buffer.shape[0]

    def close() -> None:
        if len(run) == 1:
            t = lives[run[0]]
            view = buffer[:, offsets[run[0]] : offsets[run[0]] + t.numel()]
            segments.append(Segment([view[r].view(t.shape) for r in range(k)], t))
        elif run:
            first, last = lives[run[0]], lives[run[-1]]
            lo, hi = offsets[run[0]], offsets[run[-1]] + last.numel()
            span = first.detach().as_strided((hi - lo,), (1,), first.storage_offset())
            segments.append(Segment([buffer[r, lo:hi] for r in range(k)], span, span=True))
        run.clear()

    for m, t in enumerate(lives):
        if run and adjacent[m] and joins(lives[run[0]], offsets[run[0]], t, offsets[m]):
            run.append(m)
            continue
        close()
        run.append(m)
    close()
    return segments
