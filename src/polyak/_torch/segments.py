"""Segments: one tensor's (or one run's) views in each average, paired with its live source.

A source is a live tensor, fetched afresh at every update (so a replaced ``.data`` is always
seen), or, for a *run*, a cached span: a run is a sequence of tensors that sit next to each other
in the average's buffer and whose live tensors are contiguous views of one storage with the same
layout (what ``flat_params=True`` makes of a model, :mod:`polyak._torch.flat_params`). A run is
updated as one span: one kernel instead of one per tensor. The kernels are in
:mod:`polyak._torch.update`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polyak._torch.storage import FlatStorage

__all__ = ["Segment", "build_segments", "joins", "positions", "stack_rows"]

Source = int | torch.Tensor  # index into the live list, or a cached span


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
    """``rows``: the segment's view in each average; ``live``: its source (module doc);
    ``part``: a ``(start, stop)`` slice along dim 0 of the live tensor, or ``None``."""

    __slots__ = ("live", "part", "rows", "stacked")

    def __init__(self, rows: list[torch.Tensor], live: Source, part=None) -> None:
        self.rows = rows
        self.live = live
        self.part = part
        self.stacked = stack_rows(rows)

    @property
    def numel(self) -> int:
        return self.rows[0].numel()

    def source(self, lives: Sequence[torch.Tensor]) -> torch.Tensor:
        if not isinstance(self.live, int):
            return self.live
        t = lives[self.live]
        return t if self.part is None else t[self.part[0] : self.part[1]]

    def split(self, size: int) -> list[Segment]:
        """Pieces of at most ``size`` elements per row (one piece if it cannot be cut)."""
        n = self.numel
        if n <= size:
            return [self]
        if not isinstance(self.live, int):  # a run: a flat span, cut anywhere
            return [
                Segment([r[a : a + size] for r in self.rows], self.live[a : a + size])
                for a in range(0, n, size)
            ]
        shape = self.rows[0].shape
        if len(shape) == 0 or shape[0] < 2:
            return [self]
        step = max(1, size // (n // shape[0]))  # along dim 0: valid for any live strides
        out = []
        for a in range(0, shape[0], step):
            b = min(a + step, shape[0])
            lo, hi = (a, b) if self.part is None else (self.part[0] + a, self.part[0] + b)
            out.append(Segment([r[a:b] for r in self.rows], self.live, (lo, hi)))
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
    index: Sequence[int],
) -> tuple[list[Segment], list[int]]:
    """Segments of one group, joining neighbours whose live tensors are laid out like the average.

    Args:
        buffer: the ``(K, N)`` storage buffer holding the group's averages.
        offsets: element offset of each member in ``buffer``, ascending.
        adjacent: ``adjacent[m]``: member ``m`` directly follows member ``m - 1`` in ``buffer``
            (nothing but padding between them).
        lives: all live tensors; ``lives[index[m]]`` is member ``m``'s.

    Returns:
        the segments, and the live indices whose ``data_ptr`` a cached span depends on.
    """
    segments: list[Segment] = []
    watched: list[int] = []
    run: list[int] = []
    k = buffer.shape[0]

    def close() -> None:
        if len(run) == 1:
            m = run[0]
            t = lives[index[m]]
            view = buffer[:, offsets[m] : offsets[m] + t.numel()]
            segments.append(Segment([view[r].view(t.shape) for r in range(k)], index[m]))
        elif run:
            first, last = lives[index[run[0]]], lives[index[run[-1]]]
            lo, hi = offsets[run[0]], offsets[run[-1]] + last.numel()
            span = first.detach().as_strided((hi - lo,), (1,), first.storage_offset())
            segments.append(Segment([buffer[r, lo:hi] for r in range(k)], span))
            watched.extend(index[m] for m in run)
        run.clear()

    for m, i in enumerate(index):
        if (
            run
            and adjacent[m]
            and joins(lives[index[run[0]]], offsets[run[0]], lives[i], offsets[m])
        ):
            run.append(m)
            continue
        close()
        run.append(m)
    close()
    return segments, watched


def positions(storage: FlatStorage) -> dict[str, int]:
    """Each tensor's rank by offset within its buffer (neighbours differ by one)."""
    out: dict[str, int] = {}
    for key in storage.buffers:
        names = sorted((s.offset, n) for n, s in storage.slots.items() if s.key == key)
        out.update({n: p for p, (_, n) in enumerate(names)})
    return out
