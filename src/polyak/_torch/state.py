"""Saving and loading an :class:`polyak.EMA`, sharded or not: the state-dict codec.

Format (``"format": "polyak.EMA"``, ``"version": 1``): plain tensors keyed by canonical tensor
name, per average, plus plain Python data (the step counters and every schedule's state); with
BEMA averages an ``"anchors"`` table holds each one's anchor, keyed like ``"averages"``. Under
FSDP2 and ZeRO-3 :func:`encode` holds this rank's shards and a ``"shards"`` table (global shape,
offset, local shape per tensor; for a ZeRO-3 partition also its flat offset and the partition
size); :func:`gather` makes full tensors once, for export or to resume at another world size
or on another sharding.

Loading is all or nothing: :func:`stage` checks every field and every tensor and makes every
copy that allocates (a cast, a move to the average's device) before it returns the commit, which
only writes: a bad checkpoint leaves the EMA bit for bit as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from polyak._names import check_names
from polyak._state import check_header
from polyak._timeline import Timeline
from polyak._torch import zero
from polyak._torch.naming import canonical_name
from polyak._torch.sharding import Shard, ShardInfo, full_tensor, take_shard
from polyak._torch.storage import Averages, all_finite
from polyak.errors import NonFiniteError

__all__ = ["FORMAT", "VERSION", "agree_across_ranks", "encode", "gather", "stage"]

FORMAT = "polyak.EMA"
VERSION = 1


def encode(
    timeline: Timeline, averages: Averages, dtype: torch.dtype, shards: Mapping[str, Shard]
) -> dict[str, Any]:
    """The state dict: views of the live storage (save or clone them before the next update)."""
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(dtype),
        "timeline": timeline.state_dict(),
        "averages": {n: dict(v) for n, v in zip(timeline.names, averages.averaged.views)},
        "copied": dict(averages.copied.views[0]),
    }
    k = len(timeline.names)
    if timeline.anchored:
        views = averages.averaged.views
        state["anchors"] = {
            timeline.names[i]: dict(views[k + j]) for j, i in enumerate(timeline.anchored)
        }
    if shards:
        state["shards"] = {n: s.to_dict() for n, s in shards.items()}
    return state


@torch.no_grad()
def gather(
    state: dict[str, Any], shards: Mapping[str, Shard], rank0_only: bool = False
) -> dict[str, Any] | None:
    """``state`` with full, unsharded tensors: collectives that every rank joins (FSDP2: one per
    tensor; ZeRO-3: one per dtype, only to rank 0 with ``rank0_only``, where the other ranks get
    ``None``)."""
    state.pop("shards", None)
    anchors = list(state.get("anchors", {}).values())
    tables = [*state["averages"].values(), *anchors, state["copied"]]
    flat = {n: s for n, s in shards.items() if isinstance(s, zero.ZeroShard)}
    fulls = zero.gather(tables, flat, 0 if rank0_only else None) if flat else None
    if flat and fulls is None:
        return None
    for i, table in enumerate(tables):
        for name, view in table.items():
            info = shards.get(name)
            if isinstance(info, ShardInfo):
                table[name] = full_tensor(view, info)
            else:
                table[name] = fulls[i][name] if info is not None and fulls else view.clone()
    return state


def _table(saved: Any, what: str) -> dict[str, Any]:
    if not isinstance(saved, Mapping):
        raise TypeError(f"{what} must be a mapping of tensor names to tensors, got {saved!r:.80}")
    out: dict[str, Any] = {}
    for key, value in saved.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: tensor names must be strings, got {key!r}")
        name = canonical_name(key)
        if name in out:
            raise ValueError(
                f"{what}: two entries have the canonical name {name!r} (one with a wrapper "
                f"prefix such as 'module.'); keep one"
            )
        out[name] = value
    return out


def _check_tensor(src: Any, dst: torch.Tensor, name: str, what: str) -> None:
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"{what}: {name} is a {type(src).__name__}, not a tensor")
    if src.layout != torch.strided or src.device.type == "meta":
        raise ValueError(
            f"{what}: {name} is a {src.layout} tensor on {src.device}; a state dict holds "
            "dense tensors with data"
        )
    want_float = dst.is_floating_point() or dst.is_complex()
    if want_float != (src.is_floating_point() or src.is_complex()) or (
        src.is_complex() and not dst.is_complex()
    ):
        raise TypeError(f"{what}: {name} has dtype {src.dtype}, this EMA keeps {dst.dtype}")
    if want_float and not all_finite(src):
        raise NonFiniteError(f"{what}: {name} holds inf/nan; refusing to load it", [name])


def _match(
    ours: Mapping[str, torch.Tensor],
    saved: Any,
    shards: Mapping[str, Shard],
    saved_shards: Mapping[str, Any],
    what: str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    table = _table(saved, what)
    check_names(ours, table, what)
    out = []
    for n, dst in ours.items():
        src = table[n]
        _check_tensor(src, dst, n, what)
        info = shards.get(n)
        if info is not None and tuple(src.shape) == info.global_shape != info.local_shape:
            src = take_shard(src, info)  # a full tensor: keep this rank's slice
        elif info is not None and n in saved_shards and saved_shards[n] != info.to_dict():
            raise ValueError(
                f"{what}: {n} is a shard saved as {saved_shards[n]!r:.200}, this rank holds "
                f"{info.to_dict()} (another world size or sharding); load a "
                "state_dict(full=True) instead"
            )
        if src.shape != dst.shape:
            raise ValueError(
                f"{what}: {n} has shape {tuple(src.shape)} in the state, {tuple(dst.shape)} here"
            )
        out.append((dst, src))
    return out


def stage(
    state: Any, timeline: Timeline, averages: Averages, shards: Mapping[str, Shard]
) -> Callable[[], None]:
    """Check ``state`` against this EMA and make every copy; returns the commit (writes only).

    Raises:
        TypeError, ValueError, NonFiniteError: naming the field, average or tensor at fault.
    """
    state = check_header(state, FORMAT, VERSION, ("timeline", "averages", "copied"))
    saved = state["averages"]
    if not isinstance(saved, Mapping):
        raise TypeError(f"the state dict's 'averages' must be a mapping, got {saved!r:.80}")
    check_names(timeline.names, saved, "the saved averages")
    commit_timeline = timeline.stage_state(state["timeline"])
    saved_shards = state.get("shards") or {}
    if not isinstance(saved_shards, Mapping):
        raise TypeError(f"the state dict's 'shards' must be a mapping, got {saved_shards!r:.80}")
    if saved_shards and not shards:
        raise ValueError(
            f"the state dict holds one rank's shards of {len(saved_shards)} sharded tensors (its "
            "'shards' table), and this model is not sharded; save ema.state_dict(full=True) "
            "on the sharded run and load that"
        )
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, views in zip(timeline.names, averages.averaged.views):
        pairs += _match(views, saved[name], shards, saved_shards, f"average {name!r}")
    pairs += _match(averages.copied.views[0], state["copied"], shards, saved_shards, "copied")
    if timeline.anchored:
        anchors = state.get("anchors")
        if not isinstance(anchors, Mapping):
            raise ValueError(
                f"the state dict has no 'anchors' table for the BEMA averages "
                f"{[timeline.names[i] for i in timeline.anchored]}; it was saved by an EMA "
                "without them: load it into an EMA with the same decays"
            )
        wanted = [timeline.names[i] for i in timeline.anchored]
        check_names(wanted, anchors, "the saved anchors")
        k = len(timeline.names)
        for j, name in enumerate(wanted):
            views = averages.averaged.views[k + j]
            pairs += _match(views, anchors[name], shards, saved_shards, f"anchor of {name!r}")
    elif state.get("anchors"):
        raise ValueError(
            f"the state dict holds anchors of BEMA averages {sorted(state['anchors'])!r:.200}, "
            "this EMA keeps no BEMA average: build it with the decays it was saved with"
        )
    with torch.no_grad():
        staged = [(dst, src.to(dst.device, dst.dtype)) for dst, src in pairs]

    def commit() -> None:
        commit_timeline()
        with torch.no_grad():
            for dst, src in staged:
                dst.copy_(src)

    return commit


def agree_across_ranks(sharded: bool, error: Exception | None) -> None:
    """Raise on every rank if any rank failed (sharded models only; else just raise)."""
    dist = torch.distributed
    if sharded and dist.is_available() and dist.is_initialized():
        messages: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else str(error))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise RuntimeError(f"load_state_dict failed on rank {rank}: {message}")
    if error is not None:
        raise error
