"""Target networks: ``polyak.soft_update_`` and ``polyak.hard_update_`` (RL, BYOL, MoCo, ...).

Conventions differ between fields, so the weight is always named for what it weighs:

    target <- decay * target + online_weight * online,     online_weight = 1 - decay

RL papers (DDPG, TD3, SAC) write ``tau`` for ``online_weight`` (``tau=0.005``); self-supervised
papers (BYOL, MoCo, DINO) write ``tau``/``m``/``momentum`` for ``decay`` (``0.996``). Here ``tau``
is accepted only as an alias of ``online_weight`` (the RL meaning); pass ``decay=`` for the other.

Sharded pairs (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3) are updated shard by shard, each rank on
its own slice, with no communication: both networks must be sharded the same way (checked per
tensor before anything changes). Under FSDP2 the full weights a ``no_grad`` forward leaves
registered are dropped first; under ZeRO-3 the target's gathered copies of persistent parameters
are dropped after the update, so its next forward gathers the new weights.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal

import torch
from torch import nn

from polyak._names import check_names
from polyak._torch import zero
from polyak._torch.naming import select_tensors, unwrap
from polyak._torch.sharding import fsdp_modules, reshard, sharding_of
from polyak.kernels import lerp_lists_
from polyak.types import BufferPolicy
from polyak.workflows._common import check_module

__all__ = ["hard_update_", "soft_update_"]


def _weight(online_weight: Any, tau: Any, decay: Any) -> float:
    given = {
        k: v
        for k, v in (("online_weight", online_weight), ("tau", tau), ("decay", decay))
        if v is not None
    }
    if len(given) != 1:
        raise TypeError(
            "pass exactly one of online_weight= (the weight on the online network), tau= (its RL "
            "alias: target = tau*online + (1-tau)*target) or decay= (= 1 - online_weight), got "
            + (", ".join(f"{k}={v!r}" for k, v in given.items()) or "none")
        )
    ((key, value),) = given.items()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{key} must be a number in [0, 1], got {value!r}")
    w = float(value)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"{key} must be a number in [0, 1], got {value!r}")
    return 1.0 - w if key == "decay" else w


def _pairs(
    target: nn.Module, online: nn.Module, buffers: str
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(averaged pairs, copied pairs)`` of (target, online) tensors, matched by name."""
    check_module(target, "target")
    check_module(online, "online")
    if target is online:
        raise ValueError("target and online are the same module: make the target a copy")
    for model in (target, online):
        reshard(fsdp_modules(unwrap(model)))  # the shards, not a no_grad forward's full weights
    ours = {e.name: e for e in select_tensors(target, buffers)}
    theirs = {e.name: e for e in select_tensors(online, buffers)}
    check_names(ours, theirs, "the online network does not match the target")
    averaged: list[tuple[torch.Tensor, torch.Tensor]] = []
    copied: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, entry in ours.items():
        _same_sharding(name, entry.raw(), theirs[name].raw())
        t, o = entry.get(), theirs[name].get()
        if t.shape != o.shape:
            raise ValueError(
                f"{name}: target has shape {tuple(t.shape)}, online has {tuple(o.shape)}"
            )
        if t.is_floating_point() != o.is_floating_point():
            raise ValueError(f"{name}: target is {t.dtype}, online is {o.dtype}")
        if t is o or (t.numel() > 0 and t.data_ptr() == o.data_ptr()):
            raise ValueError(
                f"{name}: target and online share this tensor, so the update would do nothing; "
                "make the target with copy.deepcopy(online)"
            )
        (averaged if entry.mode == "average" else copied).append((t, o))
    return averaged, copied


def _same_sharding(name: str, target: torch.Tensor, online: torch.Tensor) -> None:
    mine, theirs = sharding_of(target, name), sharding_of(online, name)
    if mine != theirs:
        raise ValueError(
            f"{name}: the target is {_describe(mine)} but the online network is "
            f"{_describe(theirs)}; a sharded update works shard by shard, without "
            "communication, and needs both sharded the same way (the same FSDP2 mesh and "
            "placements, or DeepSpeed ZeRO-3 over the same ranks): shard the target as the "
            "online network is"
        )


def _describe(sharding: tuple[Any, ...] | None) -> str:
    if sharding is None:
        return "not sharded"
    return f"{sharding[0]}-sharded ({sharding[1]})"


def _apply(
    averaged: list[tuple[torch.Tensor, torch.Tensor]],
    copied: list[tuple[torch.Tensor, torch.Tensor]],
    weight: float,
) -> None:
    # one _foreach_lerp_ per (device, dtype), no temporaries; a cast copy only where they differ
    lerp_lists_([t for t, _ in averaged], [o for _, o in averaged], weight)
    if copied:
        torch._foreach_copy_([t for t, _ in copied], [o for _, o in copied])


@torch.no_grad()
def soft_update_(
    target: nn.Module,
    online: nn.Module,
    *,
    online_weight: float | None = None,
    tau: float | None = None,
    decay: float | None = None,
    buffers: BufferPolicy = "average",
) -> nn.Module:
    """Move ``target`` towards ``online`` in place (Polyak averaging of a target network).

    For every floating parameter (and floating buffer, with ``buffers="average"``):

        target <- target + w * (online - target)  =  (1 - w) * target + w * online

    with ``w = online_weight = tau = 1 - decay``. Give exactly one of them, by keyword:

    * ``online_weight=0.005`` or ``tau=0.005``: the RL convention (DDPG/TD3/SAC ``tau``);
    * ``decay=0.996``: the convention of :class:`polyak.EMA` and of BYOL/MoCo/DINO momentum.

    Integer buffers (``num_batches_tracked``) are copied. Tensors are matched by canonical name
    (so a DDP-, DeepSpeed- or ``torch.compile``-wrapped online network works); names, shapes,
    kinds and shardings are all checked before anything changes. Same dtype and device: one
    ``torch._foreach_lerp_``, no allocation; otherwise one cast copy per tensor. Sharded
    networks (FSDP2, ZeRO-3) are updated shard by shard with no communication (module
    docstring); every rank calls it.

    Args:
        target: the target (teacher, momentum encoder) network, updated in place.
        online: the trained (student, query) network.
        online_weight: ``w`` in ``[0, 1]``: 0 leaves the target, 1 copies the online network.
        tau: alias of ``online_weight`` (RL notation).
        decay: ``1 - w``, the weight kept on the target.
        buffers: floating buffers are ``"average"``d (default), ``"copy"``-ed or ``"ignore"``-d.

    Returns:
        ``target``.

    Raises:
        TypeError: none or several of ``online_weight``/``tau``/``decay``; not modules.
        ValueError: a weight outside ``[0, 1]``; networks that differ in names, shapes or
            shardings, or share tensors.

    Examples:
        >>> import copy, torch, polyak
        >>> online = torch.nn.Linear(4, 2)
        >>> target = copy.deepcopy(online)
        >>> _ = polyak.soft_update_(target, online, tau=0.005)      # RL: 0.5 % online
        >>> _ = polyak.soft_update_(target, online, decay=0.995)    # the same update

    References:
        Lillicrap et al., "Continuous control with deep reinforcement learning" (DDPG), ICLR
        2016; Grill et al., "Bootstrap Your Own Latent" (BYOL), NeurIPS 2020; He et al.,
        "Momentum Contrast" (MoCo), CVPR 2020; Tarvainen & Valpola, "Mean teachers", NeurIPS
        2017.
    """
    w = _weight(online_weight, tau, decay)
    averaged, copied = _pairs(target, online, buffers)
    _apply(averaged, copied, w)
    zero.release(target.parameters())
    return target


@torch.no_grad()
def hard_update_(
    target: nn.Module, online: nn.Module, *, buffers: Literal["copy", "ignore"] = "copy"
) -> nn.Module:
    """Copy ``online``'s weights into ``target`` in place: ``target <- online``.

    The periodic target update of DQN. Parameters and integer buffers are copied; floating
    buffers too unless ``buffers="ignore"``. Tensors are matched by canonical name and checked
    (names, shapes) before anything changes. Equivalent to ``soft_update_(..., online_weight=1)``.

    Args:
        target: the target network, updated in place.
        online: the trained network.
        buffers: ``"copy"`` (default) or ``"ignore"`` for floating buffers.

    Returns:
        ``target``.

    Examples:
        >>> import copy, torch, polyak
        >>> online = torch.nn.Linear(4, 2); target = copy.deepcopy(online)
        >>> _ = polyak.hard_update_(target, online)

    References:
        Mnih et al., "Human-level control through deep reinforcement learning", Nature 2015.
    """
    if buffers not in ("copy", "ignore"):
        raise ValueError(f"buffers must be 'copy' or 'ignore', got {buffers!r}")
    averaged, copied = _pairs(target, online, buffers)
    _apply(averaged, copied, 1.0)
    zero.release(target.parameters())
    return target
