"""Using an average: swap it into the model, copy it there, or get a module that shares it.

Mixed into :class:`polyak.EMA`; the attributes below are set up by ``EMA.__init__``/``_build``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polyak._torch.naming import Entry, select_tensors, unwrap
from polyak._torch.sharding import is_dtensor, reshard
from polyak._torch.views import SwapState, shared_module, swap_in, swap_out

if TYPE_CHECKING:
    from polyak._timeline import Timeline
    from polyak._torch.storage import FlatStorage


class UseMixin:
    """Swapping, copying and module views of :class:`polyak.EMA`."""

    if TYPE_CHECKING:
        _timeline: Timeline
        _entries: list[Entry]
        _root: nn.Module
        _model: nn.Module
        _policy: tuple[str, Any, Any]
        _storage: FlatStorage | None
        _copies: FlatStorage
        _swap: SwapState | None
        _modules: dict[str, nn.Module]
        _fsdp: list[nn.Module]

        def _ensure_built(self) -> None: ...
        def _row(self, name: str | None) -> int: ...
        def _entry_order_lives(self) -> list[torch.Tensor]: ...
        def _check_same_names(self, names: Iterable[str], what: str) -> None: ...
        @staticmethod
        def _check_shape(name: str, live: torch.Tensor, view: torch.Tensor) -> None: ...

    def averaged_tensors(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """``{tensor name: view}`` of one average (averaged and copied tensors), no copies.

        Under FSDP2 these are this rank's shards; :meth:`full_state_dict` gathers them.
        """
        self._ensure_built()
        assert self._storage is not None
        row = self._storage.views[self._row(name)]
        copies = self._copies.views[0]
        return {
            e.name: row[e.name] if e.mode == "average" else copies[e.name] for e in self._entries
        }

    def _targets(self, model: nn.Module | None) -> tuple[nn.Module, list[Entry]]:
        if self._fsdp:
            reshard(self._fsdp)
        if model is None or unwrap(model) is self._root:
            return self._root, self._entries
        root = unwrap(model)
        buffers, include, exclude = self._policy
        entries = {e.name: e for e in select_tensors(root, buffers, include, exclude)}
        self._check_same_names(entries, f"{type(model).__name__}")
        return root, [entries[e.name] for e in self._entries]

    def _pairs(
        self, model: nn.Module | None, name: str | None
    ) -> tuple[nn.Module, list[Entry], list[torch.Tensor], list[torch.Tensor]]:
        """The model's tensors and average ``name``'s, matched by name and checked by shape."""
        self._ensure_built()
        root, entries = self._targets(model)
        targets = [e.get() for e in entries]
        sources = list(self.averaged_tensors(name).values())
        for e, t, v in zip(self._entries, targets, sources):
            self._check_shape(e.name, t, v)
        return root, entries, targets, sources

    def apply_shadow(self, model: nn.Module | None = None, name: str | None = None) -> None:
        """Put the averaged weights into ``model`` (default: the trained model) until
        :meth:`restore`. No copy when the average has the model's dtype and device; FSDP2
        shards are copied in (and back), since FSDP gathers from its own storage.

        Prefer ``with ema.swapped(model):``, which restores even when its body raises.
        """
        if self._swap is not None:
            raise RuntimeError("averaged weights are already swapped in; call restore() first")
        root, entries, targets, sources = self._pairs(model, name)
        by_copy = [is_dtensor(e.raw()) for e in entries]
        self._swap = swap_in(root, targets, sources, by_copy)

    def restore(self, model: nn.Module | None = None) -> None:
        """Give the model back its training weights, bit for bit, after :meth:`apply_shadow`."""
        if self._swap is None:
            raise RuntimeError("restore() without apply_shadow(): nothing is swapped in")
        state, self._swap = self._swap, None
        if self._fsdp:
            reshard(self._fsdp)  # drop full weights gathered from the average
        swap_out(state)

    @contextlib.contextmanager
    def swapped(
        self, model: nn.Module | None = None, name: str | None = None
    ) -> Iterator[nn.Module]:
        """Context manager: the model evaluates with average ``name`` inside the block.

        The training weights come back bit for bit on exit, also when the block raises. Inside
        the block ``update()`` raises, and ``model.state_dict()`` warns (it would save the
        average). Training inside the block would write into the average: don't.

        Example:
            >>> with ema.swapped(model):                      # doctest: +SKIP
            ...     val_loss = evaluate(model, val_loader)
        """
        self.apply_shadow(model, name)
        try:
            yield model if model is not None else self._model
        finally:
            self.restore()

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None, name: str | None = None) -> None:
        """Write average ``name`` into ``model``'s tensors permanently (a copy, cast as needed)."""
        if self._swap is not None:
            raise RuntimeError("copy_to() while swapped in would be undone by restore()")
        _, _, targets, sources = self._pairs(model, name)
        for t, v in zip(targets, sources):
            t.copy_(v)

    def get_module(self, name: str | None = None) -> nn.Module:
        """An ``nn.Module`` that evaluates with average ``name``, in eval mode.

        Memory: only the module structure. Its parameters and buffers *are* the average's
        storage (views, no copy), so it follows every :meth:`update`; tensors the EMA does not
        track (excluded, ``buffers="ignore"``) are shared with the trained model. It holds the
        averages in their own dtype (float32 for a bf16 model). Do not ``.to()`` or cast it:
        that would give it its own copy, detached from the average; pick ``dtype``/``device``
        when building the EMA instead. Not available for FSDP2-sharded models: use
        :meth:`swapped`.
        """
        if self._fsdp:
            raise TypeError(
                "get_module() cannot copy an FSDP2-sharded model; evaluate with "
                "`with ema.swapped(model):` or export with ema.full_state_dict()"
            )
        self._ensure_built()
        key = self._timeline.names[self._row(name)]
        if key not in self._modules:
            lives = self._entry_order_lives()
            views = self.averaged_tensors(key).values()
            replacements = {id(t): v for t, v in zip(lives, views)}
            keep = [
                t
                for m in self._root.modules()
                for t in (*m._parameters.values(), *m._buffers.values())
                if t is not None and id(t) not in replacements
            ]
            self._modules[key] = shared_module(self._root, replacements, keep)
        return self._modules[key]

    @property
    def module(self) -> nn.Module:
        """:meth:`get_module` of the only average (see there for its memory cost)."""
        return self.get_module(None)
