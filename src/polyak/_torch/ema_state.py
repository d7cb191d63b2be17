"""Saving and loading :class:`polyak.EMA` (mixed in), sharded or not.

Format (``"format": "polyak.EMA"``, ``"version": 1``): plain tensors keyed by canonical tensor
name, per average, plus plain Python data (the step counters and every schedule's state). Under
FSDP2 :meth:`~StateMixin.state_dict` holds this rank's shards and a ``"shards"`` table (global
shape, offset, local shape per tensor); :meth:`~StateMixin.full_state_dict` gathers full tensors
once, for export or to resume at another world size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from polyak._torch.naming import Entry, canonical_name
from polyak._torch.sharding import ShardInfo, full_tensor, take_shard

if TYPE_CHECKING:
    from polyak._timeline import Timeline
    from polyak._torch.storage import FlatStorage
    from polyak._torch.views import SwapState

FORMAT = "polyak.EMA"
VERSION = 1


class StateMixin:
    """``state_dict`` / ``load_state_dict`` / ``full_state_dict`` of :class:`polyak.EMA`."""

    if TYPE_CHECKING:
        _timeline: Timeline
        _entries: list[Entry]
        _dtype: torch.dtype
        _storage: FlatStorage | None
        _copies: FlatStorage
        _swap: SwapState | None
        _shards: dict[str, ShardInfo]

        def _ensure_built(self) -> None: ...

    def _tensor_tables(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        assert self._storage is not None
        tables = list(zip(self._timeline.names, self._storage.views))
        return [*tables, ("copied", self._copies.views[0])]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: plain tensors, plain Python data, a format version.

        The tensors are views of the live storage (like ``nn.Module.state_dict``): save them
        (``torch.save``) or clone them before the next update. Loadable with
        ``torch.load(..., weights_only=True)``. Under FSDP2 each rank gets its own shards.
        """
        self._ensure_built()
        tables = self._tensor_tables()
        state: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": str(self._dtype),
            "timeline": self._timeline.state_dict(),
            "averages": {name: dict(table) for name, table in tables[:-1]},
            "copied": dict(tables[-1][1]),
        }
        if self._shards:
            state["shards"] = {n: s.to_dict() for n, s in self._shards.items()}
        return state

    @torch.no_grad()
    def full_state_dict(self, rank0_only: bool = True) -> dict[str, Any] | None:
        """:meth:`state_dict` with full, unsharded tensors (FSDP2); a collective on every rank.

        Every rank must call it. With ``rank0_only`` only rank 0 receives the result (the others
        get ``None``); it loads at any world size, or into an unsharded model. Without sharding
        it is a copy of :meth:`state_dict`.
        """
        state = self.state_dict()
        state.pop("shards", None)
        for key in [*state["averages"], None]:
            table = state["copied"] if key is None else state["averages"][key]
            for name, view in table.items():
                info = self._shards.get(name)
                table[name] = full_tensor(view, info) if info else view.clone()
        if rank0_only and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return None
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` or :meth:`full_state_dict` output; all checks come first.

        Saved values are copied into this EMA's storage, which keeps its dtype (a float32 average
        stays float32 whatever the checkpoint held). Tensor names may carry wrapper prefixes.
        Under FSDP2 a full checkpoint (any world size) is cut into this rank's shards, and a
        rank whose checkpoint does not fit raises on every rank instead of leaving the others
        waiting in the next collective.
        """
        if self._swap is not None:
            raise RuntimeError("load_state_dict() while swapped in; call restore() first")
        self._ensure_built()
        error: Exception | None = None
        plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            plan = self._plan_load(state)
        except (ValueError, KeyError, TypeError) as e:
            error = e
        self._agree_across_ranks(error)
        assert error is None
        self._timeline.load_state_dict(state["timeline"])
        for dst, src in plan:
            dst.copy_(src)

    def _plan_load(self, state: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise ValueError(
                f"not a {FORMAT} v{VERSION} state dict (format={state.get('format')!r}, "
                f"version={state.get('version')!r})"
            )
        averages = state["averages"]
        if set(averages) != set(self._timeline.names):
            raise ValueError(
                f"averages differ: saved {sorted(averages)}, this EMA has "
                f"{list(self._timeline.names)}"
            )
        saved_shards = state.get("shards", {})
        plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        for key, ours in self._tensor_tables():
            saved = state["copied"] if key == "copied" else averages[key]
            what = "copied tensors" if key == "copied" else f"average {key!r}"
            plan += self._match(ours, saved, saved_shards, what)
        return plan

    def _match(
        self,
        ours: Mapping[str, torch.Tensor],
        saved: Mapping[str, Any],
        saved_shards: Mapping[str, Any],
        what: str,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        saved = {canonical_name(k): v for k, v in saved.items()}
        missing = [n for n in ours if n not in saved]
        extra = [n for n in saved if n not in ours]
        if missing or extra:
            raise ValueError(f"{what}: missing {missing}, unexpected {extra}")
        out = []
        for n, dst in ours.items():
            src = saved[n]
            if not isinstance(src, torch.Tensor):
                raise TypeError(f"{what}: {n} is a {type(src).__name__}, not a tensor")
            info = self._shards.get(n)
            if (
                info is not None
                and tuple(src.shape) == info.global_shape
                and (info.global_shape != info.local_shape)
            ):
                src = take_shard(src, info)  # a full tensor: keep this rank's slice
            elif (
                info is not None
                and n in saved_shards
                and (list(info.offset) != list(saved_shards[n]["offset"]))
            ):
                raise ValueError(
                    f"{what}: {n} is a shard saved at offset {saved_shards[n]['offset']}, this "
                    f"rank holds offset {list(info.offset)}; load a full_state_dict() instead"
                )
            if src.shape != dst.shape:
                raise ValueError(
                    f"{what}: {n} has shape {tuple(src.shape)} in the state, "
                    f"{tuple(dst.shape)} here"
                )
            out.append((dst, src))
        return out

    def _agree_across_ranks(self, error: Exception | None) -> None:
        """Raise on every rank if any rank failed (sharded models only; else just raise)."""
        dist = torch.distributed
        if self._shards and dist.is_available() and dist.is_initialized():
            messages: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(messages, None if error is None else str(error))
            failed = [(r, m) for r, m in enumerate(messages) if m is not None]
            if failed and error is None:
                rank, message = failed[0]
                raise RuntimeError(f"load_state_dict failed on rank {rank}: {message}")
        if error is not None:
            raise error
