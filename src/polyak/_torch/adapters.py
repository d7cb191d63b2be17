"""PEFT adapter layers under a swap: merged adapters, and the non-tensor state of adapters.

A PEFT tuner layer (LoRA, IA3, LoHa, ...) can *merge* its adapter into the frozen base weight
(``merge_adapter()``), after which the forward pass no longer reads the adapter. The base weight
is frozen, so an :class:`polyak.EMA` does not store it (its average is itself) and a swap does
not touch it. Two things would then go wrong:

* a layer merged before the swap holds the *live* adapter in its base weight: swapping the
  adapter's average in would change nothing the forward pass reads;
* a layer merged inside the swap adds the *average* to the base weight, which stays there after
  the swap, where the live adapter is back (an ``unmerge_adapter()`` afterwards subtracts the
  live adapter: the base is corrupted).

:func:`enter` (before the swap) unmerges the layers merged with the live adapters and wraps each
layer's ``merge`` so that its base tensors are copied before a merge inside the swap; :func:`leave`
(after) puts every base tensor that was copied back, bit for bit, with the layer's merged list.
Copies are made only for layers that merge: nothing for unmerged models.

Layers are recognised by duck typing (a ``merged_adapters`` list, ``get_base_layer``, ``merge``
and ``unmerge``): polyak does not import PEFT. :func:`fingerprint` summarises the non-tensor
state a layer's forward reads (active adapters, ``scaling``, disabled, merged), so that a module
built for an average (``EMA.get_module``) is rebuilt when it changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["AdapterState", "enter", "fingerprint", "leave"]


def _layers(root: nn.Module) -> Iterator[Any]:  # PEFT tuner layers, duck-typed
    for m in root.modules():
        if (
            isinstance(getattr(m, "merged_adapters", None), list)
            and callable(getattr(m, "get_base_layer", None))
            and callable(getattr(m, "merge", None))
            and callable(getattr(m, "unmerge", None))
        ):
            yield m


@dataclass
class AdapterState:
    """The base tensors copied while averages are swapped in, to be put back by :func:`leave`."""

    saved: dict[int, tuple[Any, list[str], list[tuple[torch.Tensor, torch.Tensor]]]] = field(
        default_factory=dict
    )
    wrapped: list[Any] = field(default_factory=list)


def _save(state: AdapterState, layer: Any) -> None:
    if id(layer) in state.saved:
        return
    base = layer.get_base_layer()
    tensors = [t for t in (*base._parameters.values(), *base._buffers.values()) if t is not None]
    copies = [(t, t.detach().clone()) for t in tensors]  # before anything changes
    state.saved[id(layer)] = (layer, list(layer.merged_adapters), copies)


def enter(root: nn.Module) -> AdapterState:
    """Before averages are swapped into ``root``: unmerge the adapters merged with the live
    weights (their base tensors copied first) and watch merges inside the swap."""
    state = AdapterState()
    layers = list(_layers(root))
    try:
        for layer in layers:
            if layer.merged_adapters:
                _save(state, layer)
                layer.unmerge()
        for layer in layers:
            merge = layer.merge

            def merge_(
                *args: Any, _layer: nn.Module = layer, _merge: Any = merge, **kw: Any
            ) -> Any:
                _save(state, _layer)
                return _merge(*args, **kw)

            vars(layer)["merge"] = merge_  # shadows the method until leave()
            state.wrapped.append(layer)
    except BaseException:
        leave(state)
        raise
    return state


def leave(state: AdapterState) -> None:
    """Put back every base tensor :func:`enter` or a merge inside the swap copied, and the
    layers' merged adapters as they were: the base is bit for bit what it was before."""
    for layer in state.wrapped:
        vars(layer).pop("merge", None)
    state.wrapped.clear()
    with torch.no_grad():
        for layer, merged, copies in state.saved.values():
            base = layer.get_base_layer()
            by_id = {id(t): t for t in (*base._parameters.values(), *base._buffers.values())}
            for tensor, copy in copies:
                live = by_id.get(id(tensor), tensor)
                if live.shape == copy.shape and live.dtype == copy.dtype:
                    live.copy_(copy)
                else:
                    live.data = copy
            layer.merged_adapters[:] = merged
    state.saved.clear()


def fingerprint(root: nn.Module) -> tuple[Any, ...] | None:
    """The non-tensor state the adapter layers' forward reads, or ``None`` without such layers."""
    out = []
    for layer in _layers(root):
        scaling = getattr(layer, "scaling", None)
        out.append(
            (
                tuple(getattr(layer, "active_adapters", ()) or ()),
                tuple(sorted(scaling.items())) if isinstance(scaling, dict) else None,
                bool(getattr(layer, "disable_adapters", False)),
                tuple(layer.merged_adapters),
            )
        )
    return tuple(out) if out else None
