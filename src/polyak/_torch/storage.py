"""Flat storage: one contiguous buffer per (device, dtype) group, a named view per tensor.

The averages of a model live in a ``(K, N)`` buffer per group, one row per average; every tensor
of average ``k`` is a view of row ``k``. An update is then a few multi-tensor kernels over
contiguous memory, several averages sit next to each other, and ``torch.save`` writes each
buffer once. (DESIGN.md, "storage".)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["FlatStorage", "Slot"]

_ALIGN_BYTES = 64  # each view starts on a cache line: vector loads stay aligned


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives: its group, offset and shape."""

    name: str
    key: tuple[torch.device, torch.dtype]
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass
class FlatStorage:
    """``rows`` copies of a set of named tensors, packed per (device, dtype).

    Args:
        specs: ``(name, shape, dtype, device)`` of each tensor, in order.
        rows: how many copies (averages) to keep.
    """

    specs: Sequence[tuple[str, torch.Size, torch.dtype, torch.device]]
    rows: int = 1
    buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(init=False)
    slots: dict[str, Slot] = field(init=False)
    views: list[dict[str, torch.Tensor]] = field(init=False)

    def __post_init__(self) -> None:
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        self.slots = {}
        for name, shape, dtype, device in self.specs:
            key = (torch.device(device), dtype)
            align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
            offset = -(-sizes.get(key, 0) // align) * align
            self.slots[name] = Slot(name, key, offset, torch.Size(shape))
            sizes[key] = offset + torch.Size(shape).numel()
        self.buffers = {
            key: torch.zeros((self.rows, n), dtype=key[1], device=key[0])
            for key, n in sizes.items()
        }
        self.views = [
            {
                name: self.buffers[s.key][row, s.offset : s.offset + s.numel].view(s.shape)
                for name, s in self.slots.items()
            }
            for row in range(self.rows)
        ]

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers (padding included)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def group_views(self, row: int) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
        """Views of ``row`` grouped by buffer, in the order of ``specs``."""
        out: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for name, s in self.slots.items():
            out.setdefault(s.key, []).append(self.views[row][name])
        return out
