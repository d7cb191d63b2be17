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
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["SwapState", "shared_module", "swap_in", "swap_out"]


class SwapState:
    """The live tensors' own data (or a copy of it), held while averages are swapped in."""

    def __init__(
        self,
        targets: Sequence[torch.Tensor],
        saved: Sequence[torch.Tensor],
        by_copy: Sequence[bool],
    ) -> None:
        self.targets = list(targets)
        self.saved = list(saved)
        self.by_copy = list(by_copy)
        self.hook: Any = None
        # (index, source, version) of targets that see a copy of their source
        self.copies: list[tuple[int, torch.Tensor, int]] = []


def _warn_state_dict(module: nn.Module, *args: Any, **kwargs: Any) -> None:
    warnings.warn(
        "state_dict() of a model whose averaged weights are swapped in: this saves the "
        "average, not the training weights. Save after the `with ema.swapped(...)` block "
        "(or restore()) to checkpoint the training weights.",
        UserWarning,
        stacklevel=3,
    )


def swap_in(
    root: nn.Module,
    targets: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
    by_copy: Sequence[bool],
) -> SwapState:
    """Point each target's ``.data`` at the matching source (cast copy if dtype/device differ);
    where ``by_copy``, copy the source into the target instead, keeping a copy of its data."""
    state = SwapState(targets, [], by_copy)
    with torch.no_grad():
        state.saved = [t.detach().clone() if c else t.data for t, c in zip(targets, by_copy)]
        for i, (t, s, c) in enumerate(zip(targets, sources, by_copy)):
            if c:
                t.copy_(s)
            elif s.dtype == t.dtype and s.device == t.device:
                t.data = s
                continue
            else:
                t.data = s.to(t.device, t.dtype)
            state.copies.append((i, s, t._version))
    state.hook = root.register_state_dict_pre_hook(_warn_state_dict)
    return state


def swap_out(state: SwapState) -> None:
    """Write back what was written into copies; give every target its own data back exactly."""
    with torch.no_grad():
        for i, source, version in state.copies:
            if state.targets[i]._version != version:
                source.copy_(state.targets[i])
        for t, s, c in zip(state.targets, state.saved, state.by_copy):
            if c:
                t.copy_(s)
            else:
                t.data = s
    if state.hook is not None:
        state.hook.remove()


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
