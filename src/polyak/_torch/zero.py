"""DeepSpeed ZeRO-3 partitions: each rank averages its own flat slice of every parameter.

Under ZeRO stage 3 a parameter's weights live in ``param.ds_tensor``: this rank's partition, the
elements ``[rank * n, rank * n + n)`` of the flattened full tensor with
``n = ceil(ds_numel / world)``, the tail of the last partitions padded with memory that was never
initialised (so polyak never reads it: the *valid* prefix of each partition is what it averages).
``param.data`` is empty outside a forward pass, except for parameters under
``stage3_param_persistence_threshold``, which DeepSpeed keeps gathered between steps
(``ds_persist``): ZeRO-3 is therefore recognised by the partition attributes (``ds_tensor``,
``ds_numel``, ``ds_shape``), never by an empty ``param.data``. ZeRO-1/2 parameters are full
replicas and need nothing here.

An update reads each partition in place (the optimizer updates ``ds_tensor`` in place), so it
issues no collective and keeps ``model / world`` elements per rank. Full tensors are gathered
only on request (:func:`gather`: one collective per dtype), and a full checkpoint is cut back
into this rank's partition when loaded (:func:`take_partition`, any world size). Writing averaged
weights into the partitions leaves the gathered copies of persistent parameters stale, so they
are dropped (:func:`release`, no communication): the next forward gathers them from the
partitions, as DeepSpeed does after loading a checkpoint.

DeepSpeed is imported only by :func:`gathered`, for a model that has ZeRO-3 parameters: a run
that uses it has imported it already.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "ZeroShard",
    "check_swappable",
    "engine_module",
    "gather",
    "gathered",
    "is_partitioned",
    "on_any_rank",
    "partition",
    "release",
    "same_partition",
    "take_partition",
    "zero_shard",
]


def is_partitioned(t: object) -> bool:
    """``t`` is a ZeRO-3 parameter (it carries its partition, gathered or not)."""
    return getattr(t, "ds_tensor", None) is not None and hasattr(t, "ds_numel")


def engine_module(model: object) -> nn.Module | None:
    """The module inside a ``deepspeed.DeepSpeedEngine`` (``None`` for anything else)."""
    engine = sys.modules.get("deepspeed.runtime.engine")
    if engine is not None and isinstance(model, engine.DeepSpeedEngine):
        inner = getattr(model, "module", None)
        return inner if isinstance(inner, nn.Module) else None
    return None


def _geometry(p: Any) -> tuple[int, int, int, int]:
    """``(rank, world, elements per partition, valid elements here)`` of a ZeRO-3 parameter."""
    import torch.distributed as dist

    group = p.ds_process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    size = p.ds_tensor.numel()
    return rank, world, size, max(0, min(size, p.ds_numel - rank * size))


def partition(p: Any) -> torch.Tensor:
    """The weights this rank holds of ``p``: its partition without the padding (a view)."""
    ds = p.ds_tensor
    valid = _geometry(p)[3]
    return ds if valid == ds.numel() else ds.narrow(0, 0, valid)


def same_partition(p: Any, live: torch.Tensor) -> bool:
    """``live`` (a :func:`partition` taken earlier) still views ``p``'s partition: DeepSpeed
    moves partitions by assigning ``ds_tensor.data`` (into its flat buffers at
    ``deepspeed.initialize``), which a view taken before does not follow."""
    ds = p.ds_tensor
    return ds.data_ptr() == live.data_ptr() and ds.device == live.device and ds.dtype == live.dtype


@dataclass(frozen=True)
class ZeroShard:
    """Where this rank's partition sits in the full tensor.

    ``local_shape`` is ``(valid elements,)``; they are the elements ``[flat_offset,
    flat_offset + valid)`` of the flattened full tensor, and ``offset`` is the full-tensor index
    of the first one (``global_shape[0]`` and zeros for an empty partition). ``partition`` is
    every rank's partition size (with padding): rank ``r`` starts at ``r * partition``.
    """

    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    local_shape: tuple[int, ...]
    flat_offset: int
    partition: int
    group: Any = field(compare=False, repr=False)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.global_shape).numel())

    def to_dict(self) -> dict[str, Any]:
        return {
            "global_shape": list(self.global_shape),
            "offset": list(self.offset),
            "local_shape": list(self.local_shape),
            "flat_offset": self.flat_offset,
            "partition": self.partition,
        }


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
        return ()
    if index >= torch.Size(shape).numel():
        return (shape[0],) + (0,) * (len(shape) - 1)
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return tuple(reversed(out))


def zero_shard(p: Any, name: str) -> ZeroShard:
    """The geometry of ``p``'s partition on this rank.

    Raises:
        ValueError: the partitions span a subgroup of the ranks (MiCS), which the gathering and
            loading here do not handle.
    """
    import torch.distributed as dist

    rank, world, size, valid = _geometry(p)
    if world != dist.get_world_size():
        raise ValueError(
            f"{name} is partitioned over {world} of the {dist.get_world_size()} ranks (MiCS or "
            "another sub-group partitioning): polyak averages ZeRO-3 partitions that span every "
            "rank; use plain ZeRO-3 (no mics_shard_size)"
        )
    shape = tuple(int(s) for s in p.ds_shape)
    start = rank * size
    return ZeroShard(shape, _unravel(start, shape), (valid,), start, size, p.ds_process_group)


def take_partition(full: torch.Tensor, info: ZeroShard) -> torch.Tensor:
    """This rank's valid elements of ``full`` (a full tensor of ``info.global_shape``)."""
    flat = full.reshape(-1)
    return flat.narrow(0, min(info.flat_offset, flat.numel()), info.local_shape[0])


@torch.no_grad()
def gather(
    tables: Sequence[Mapping[str, torch.Tensor]],
    shards: Mapping[str, ZeroShard],
    dst: int | None,
) -> list[dict[str, torch.Tensor]] | None:
    """Full tensors of the partitions in ``tables`` (each ``{name: this rank's valid part}``),
    for the names in ``shards``: one collective per (device, dtype), which every rank joins.

    Each rank packs its valid parts into a buffer laid out by partition size (the same on every
    rank), so that the buffers of all ranks line up; ``dst=None`` gives every rank the result,
    ``dst=r`` only rank ``r`` (the others get ``None``).
    """
    import torch.distributed as dist

    group = next(iter(shards.values())).group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    by_key: dict[tuple[torch.device, torch.dtype], list[tuple[int, str, torch.Tensor]]] = {}
    for i, table in enumerate(tables):
        for name, view in table.items():
            if name in shards:
                by_key.setdefault((view.device, view.dtype), []).append((i, name, view))
    out: list[dict[str, torch.Tensor]] = [{} for _ in tables]
    receives = dst is None or rank == dst
    for (device, dtype), items in by_key.items():
        offsets, total = [], 0
        for _, name, _ in items:
            offsets.append(total)
            total += shards[name].partition
        send = torch.zeros(total, dtype=dtype, device=device)
        for (_, _, view), off in zip(items, offsets):
            send[off : off + view.numel()].copy_(view.reshape(-1))
        parts = [torch.empty_like(send) for _ in range(world)] if receives else None
        if dst is None:
            dist.all_gather(parts, send, group=group)
        else:
            dist.gather(send, parts, dst=dist.get_global_rank(group, dst), group=group)
        if parts is None:
            continue
        stacked = torch.stack(parts)  # (world, total): rank r's partitions in row r
        for (i, name, _), off in zip(items, offsets):
            info = shards[name]
            flat = stacked[:, off : off + info.partition].reshape(-1)[: info.numel]
            out[i][name] = flat.view(info.global_shape)
    return out if receives else None


def _available(p: Any) -> bool:
    status = getattr(p, "ds_status", None)
    return getattr(status, "name", None) == "AVAILABLE"


def check_swappable(params: Iterable[Any]) -> None:
    """Refuse partitions with a second, hierarchical copy (ZeRO++ ``zero_hpz_partition_size``):
    the forward gathers from that copy, which writing into ``ds_tensor`` leaves stale.

    Raises:
        TypeError: naming the configuration.
    """
    for p in params:
        if is_partitioned(p) and getattr(p, "ds_secondary_tensor", None) is not None:
            raise TypeError(
                "the model uses ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1), "
                "whose secondary partitions the averaged weights cannot be written into; "
                "evaluate on a model without it, or export with ema.state_dict(full=True)"
            )


def release(params: Iterable[Any]) -> None:
    """Drop the gathered full copies of partitioned parameters (the persistent ones keep theirs
    between steps), so that the next forward gathers them from the partitions. Frees memory
    only: no communication."""
    held = [p for p in params if is_partitioned(p) and _available(p)]
    if held:
        held[0].partition(held)


def on_any_rank(flag: bool, model: nn.Module) -> bool:
    """``flag`` is true on some rank of ``model``'s ZeRO-3 partition group (one all-reduce that
    every rank joins): a check that fails on one rank only must stop every rank before a
    gather, or the others wait for it. ``flag`` itself for a model without ZeRO-3 parameters."""
    p: Any = next((p for p in model.parameters() if is_partitioned(p)), None)
    if p is None:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=p.ds_tensor.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=p.ds_process_group)
    return bool(t.item())


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside the block the ZeRO-3 parameters of ``model`` hold their full weights, gathered
    from the partitions (DeepSpeed's ``GatheredParameters``, read only: a collective that every
    rank joins); nothing for a model without them."""
    params = [p for p in model.parameters() if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
