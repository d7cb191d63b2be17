"""Putting averaged weights into a model: pointer swaps and a module sharing the storage.

Both avoid copies where the average has the model's dtype and device: a swap rebinds each live
tensor's ``.data`` to the average's view and later rebinds it back to the very tensor it had,
so the training weights come back bit for bit. Where dtype or device differ, the swap makes one
cast copy of each tensor (the size of the model in its own dtype); FSDP2 shards are copied in
place. Where the model then sees a copy, anything written into it during the swap (BatchNorm
statistics recomputed inside ``ema.swapped(...)``) is written back to the average on exit; a
tensor's version counter tells whether it was written.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from polyak._torch.adapters import AdapterState, leave
from polyak.errors import SwappedStateDictWarning

__all__ = ["SwapState", "guard", "shared_module", "swap_in", "swap_out"]


class SwapState:
    """The live tensors' own data (or a copy of it), held while averages are swapped in."""

    def __init__(
        self,
        names: Sequence[str],
        targets: Sequence[torch.Tensor],
        saved: Sequence[torch.Tensor],
        by_copy: Sequence[bool],
    ) -> None:
        self.names = list(names)
        self.targets = list(targets)
        self.saved = list(saved)
        self.by_copy = list(by_copy)
        self.hook: Any = None
        self.finalizer: Any = None
        self.adapters: AdapterState | None = None  # PEFT base tensors to put back
        # (index, source, version) of targets that see a copy of their source
        self.copies: list[tuple[int, torch.Tensor, int]] = []
        # (index, version) of the parameters, whose writes (an optimizer step) are training
        self.versions: list[tuple[int, int]] = []
        # ZeRO-3 parameters whose gathered copies are dropped on the way in and out
        self.partitioned: list[Any] = []


def _warn_state_dict(module: nn.Module, *args: Any, **kwargs: Any) -> None:
    warnings.warn(
        "state_dict() of a model whose averaged weights are swapped in: this saves the "
        "average, not the training weights. Save after the `with ema.swapped(...)` block "
        "(or restore()) to checkpoint the training weights.",
        SwappedStateDictWarning,
        stacklevel=3,
    )


def swap_in(
    root: nn.Module,
    names: Sequence[str],
    targets: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
    by_copy: Sequence[bool],
    params: Sequence[bool],
) -> SwapState:
    """Point each target's ``.data`` at the matching source (cast copy if dtype/device differ);
    where ``by_copy``, copy the source into the target instead, keeping a copy of its data.

    All or nothing: everything that allocates (the copies of copied targets' data, the cast
    copies) is made before the first target changes, and a failure while exchanging puts back
    what was exchanged, so the model either holds the average everywhere or nowhere.
    """
    state = SwapState(names, targets, [], by_copy)
    with torch.no_grad():
        state.saved = [t.detach().clone() if c else t.data for t, c in zip(targets, by_copy)]
        cast = [
            None if c or (s.dtype == t.dtype and s.device == t.device) else s.to(t.device, t.dtype)
            for t, s, c in zip(targets, sources, by_copy)
        ]
        done = 0
        try:
            for t, s, c, x in zip(targets, sources, by_copy, cast):
                if c:
                    t.copy_(s)
                else:
                    t.data = s if x is None else x
                done += 1
        except BaseException:
            for t, old, c in zip(targets[:done], state.saved, by_copy):
                if c:
                    t.copy_(old)
                else:
                    t.data = old
            raise
    for i, (t, c, x) in enumerate(zip(targets, by_copy, cast)):
        if c or x is not None:
            state.copies.append((i, sources[i], t._version))
        if params[i]:
            state.versions.append((i, t._version))
    state.hook = root.register_state_dict_pre_hook(_warn_state_dict)
    return state


def swap_out(state: SwapState) -> list[str]:
    """Write back what was written into copies; give every target its own data back exactly.

    Returns:
        the names of the parameters written during the swap (training on swapped weights).
    """
    written = [state.names[i] for i, v in state.versions if state.targets[i]._version != v]
    with torch.no_grad():
        for i, source, version in state.copies:
            if state.targets[i]._version != version:
                source.copy_(state.targets[i])
        for t, s, c in zip(state.targets, state.saved, state.by_copy):
            if c:
                t.copy_(s)
            else:
                t.data = s
    if state.adapters is not None:
        leave(state.adapters)
    if state.hook is not None:
        state.hook.remove()
    if state.finalizer is not None:
        state.finalizer.detach()
    return written


def _abandoned(state: SwapState) -> None:
    swap_out(state)
    warnings.warn(
        "an EMA was garbage-collected while its average was swapped into the model; the "
        "training weights have been put back. Leave `with ema.swapped(...)` (or call "
        "restore()) before dropping the EMA.",
        UserWarning,
        stacklevel=2,
    )


def guard(owner: object, state: SwapState) -> None:
    """Put the training weights back if ``owner`` is collected while ``state`` is swapped in."""
    state.finalizer = weakref.finalize(owner, _abandoned, state)
    state.finalizer.atexit = False


def shared_module(
    root: nn.Module, replacements: dict[int, torch.Tensor], keep: Sequence[torch.Tensor]
) -> nn.Module:
    """A structural copy of ``root`` whose tensors are ``replacements[id(live_tensor)]``.

    Parameters become ``nn.Parameter(view, requires_grad=False)`` sharing the view's storage;
    tensors in ``keep`` are shared with the live model; anything else (plain tensor attributes)
    is deep-copied. Tied weights stay tied (one replacement per live tensor).
    """
    memo: dict[int, Any] = {id(t): t for t in keep}
    for key, view in replacements.items():
        memo[key] = view
    for module in root.modules():
        for p in module._parameters.values():
            if (
                p is not None
                and id(p) in replacements
                and not isinstance(memo[id(p)], nn.Parameter)
            ):
                memo[id(p)] = nn.Parameter(replacements[id(p)], requires_grad=False)
    try:
        clone = copy.deepcopy(root, memo)
    except Exception as e:  # pragma: no cover - depends on the user's model
        raise TypeError(
            f"cannot build a module for the average: {type(root).__name__} does not deep-copy "
            f"({e}). Use `with ema.swapped(model):` instead."
        ) from e
    clone.eval()
    return clone
