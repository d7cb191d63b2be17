"""Sharded parameters (FSDP2 ``fully_shard`` / DTensor): local shards in, full tensors out.

Under FSDP2 every rank owns one ``Shard(0)`` slice of each parameter (uneven: the first ranks
get ``ceil(n / world)`` rows). polyak averages that local slice in the rank's own flat storage,
so an update issues no collective at all; tensors are gathered only when a full average is
exported, and a full checkpoint is cut back into this rank's slice when loaded (any world size).

FSDP2 all-gathers parameters from its own sharded storage, which the local tensor
(``param._local_tensor``) aliases; swapping averaged weights in therefore *copies* into the local
shard (and back), and unsharded parameters left over from a ``no_grad`` forward are dropped with
``reshard()`` first, so that a forward cannot reuse stale full weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "ShardInfo",
    "fsdp_modules",
    "full_tensor",
    "local",
    "reshard",
    "shard_info",
    "take_shard",
]


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels work on: a DTensor's local shard (a stable alias), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank's slice sits in the full tensor, and how to gather it."""

    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    local_shape: tuple[int, ...]
    stride: tuple[int, ...]
    mesh: Any = field(compare=False, repr=False)
    placements: Any = field(compare=False, repr=False)

    def to_dict(self) -> dict[str, list[int]]:
        return {
            "global_shape": list(self.global_shape),
            "offset": list(self.offset),
            "local_shape": list(self.local_shape),
        }


def shard_info(t: torch.Tensor) -> ShardInfo | None:
    """Shard geometry of a DTensor (``None`` for a plain tensor)."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        t.shape,
        t.device_mesh,  # type: ignore[attr-defined]
        t.placements,  # type: ignore[attr-defined]
    )
    return ShardInfo(
        tuple(t.shape),
        tuple(offset),
        tuple(shape),
        tuple(t.stride()),
        t.device_mesh,  # type: ignore[attr-defined]
        t.placements,  # type: ignore[attr-defined]
    )


def take_shard(full: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """This rank's slice of ``full`` (a view)."""
    out = full
    for dim, (start, size) in enumerate(zip(info.offset, info.local_shape)):
        if size != full.shape[dim]:
            out = out.narrow(dim, start, size)
    return out


def full_tensor(local_view: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """Gather the shards of ``local_view`` laid out as ``info`` says (a collective)."""
    cls = _dtensor_type()
    dt = cls.from_local(
        local_view,
        info.mesh,
        info.placements,
        shape=torch.Size(info.global_shape),
        stride=info.stride,
        run_check=False,
    )
    return dt.full_tensor()


def fsdp_modules(root: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules inside ``root`` (empty when FSDP2 is not in use)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def reshard(modules: list[nn.Module]) -> None:
    """Drop unsharded parameters (no communication), so the registered ones are the shards."""
    for m in modules:
        m.reshard()  # type: ignore[operator]
