"""Sharded parameters (FSDP2 ``fully_shard`` / DTensor): local shards in, full tensors out.

Under FSDP2 every rank owns one ``Shard(0)`` slice of each parameter (uneven: the first ranks
get ``ceil(n / world)`` rows). polyak averages that local slice in the rank's own flat storage,
so an update issues no collective at all; tensors are gathered only when a full average is
exported, and a full checkpoint is cut back into this rank's slice when loaded (any world size).

FSDP2 all-gathers parameters from its own sharded storage, which the local tensor
(``param._local_tensor``) aliases; swapping averaged weights in therefore *copies* into the local
shard (and back), and unsharded parameters left over from a ``no_grad`` forward are dropped with
``reshard()`` first, so that a forward cannot reuse stale full weights.

DeepSpeed ZeRO-3 partitions (flat slices, not blocks) have their own module,
:mod:`polyak._torch.zero`; the functions here dispatch to it, so that the rest of polyak sees one
kind of "sharded tensor": :func:`local` (what the kernels read), :func:`shard_info` (where it
sits), :func:`take_shard` (this rank's part of a full tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from polyak._torch import zero
from polyak._torch.zero import ZeroShard

__all__ = [
    "Shard",
    "ShardInfo",
    "fsdp_modules",
    "full_tensor",
    "is_sharded",
    "local",
    "reshard",
    "same_local",
    "shard_info",
    "sharding_of",
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


def is_sharded(t: object) -> bool:
    """``t`` is an FSDP2 DTensor or a ZeRO-3 parameter: this rank holds part of it."""
    return is_dtensor(t) or zero.is_partitioned(t)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels work on: a DTensor's local shard (a stable alias), a ZeRO-3
    parameter's partition without padding (a view), else ``t``."""
    if is_dtensor(t):
        return t._local_tensor  # type: ignore[attr-defined]
    return zero.partition(t) if zero.is_partitioned(t) else t


def same_local(t: torch.Tensor, live: torch.Tensor) -> bool:
    """``live`` (``local(t)`` taken earlier) is still what ``local(t)`` reads."""
    if zero.is_partitioned(t):
        return zero.same_partition(t, live)
    return local(t) is live


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


Shard = ShardInfo | ZeroShard


def shard_info(t: torch.Tensor, name: str = "") -> Shard | None:
    """Shard geometry of a DTensor or a ZeRO-3 parameter (``None`` for a plain tensor)."""
    if zero.is_partitioned(t):
        return zero.zero_shard(t, name)
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


def sharding_of(t: torch.Tensor, name: str = "") -> tuple[Any, ...] | None:
    """How ``t`` is sharded, as a comparable value (``None``: not sharded): the kind, this
    rank's place in the full tensor, and the ranks (FSDP2: the mesh and placements; ZeRO-3: the
    partitioning group). Two tensors with equal values hold the same slice on every rank."""
    info = shard_info(t, name)
    if info is None:
        return None
    if isinstance(info, ZeroShard):
        import torch.distributed as dist

        return ("ZeRO-3", info.to_dict(), tuple(dist.get_process_group_ranks(info.group)))
    mesh = getattr(info.mesh, "mesh", None)
    ranks = tuple(mesh.flatten().tolist()) if mesh is not None else ()
    return ("FSDP2", info.to_dict(), tuple(str(p) for p in info.placements), ranks)


def take_shard(full: torch.Tensor, info: Shard) -> torch.Tensor:
    """This rank's slice of ``full`` (a view)."""
    if isinstance(info, ZeroShard):
        return zero.take_partition(full, info)
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
