"""Canonical tensor names and the choice of tensors an average tracks.

Wrappers add prefixes to tensor names: DDP, DataParallel and DeepSpeed's engine ``module.``,
``torch.compile``
``_orig_mod.``, FSDP1 ``_fsdp_wrapped_module.``, activation checkpointing
``_checkpoint_wrapped_module.``. A name that changes with the wrapping silently breaks peers that
match by name (an average saved through DDP matches none of the names of the unwrapped model).
Every name polyak shows or saves is canonical: the wrapper objects are unwrapped at the root,
and wrapper components are stripped here, in one place.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from polyak._names import check_names
from polyak._torch.sharding import local
from polyak._torch.zero import engine_module

__all__ = [
    "Entry",
    "canonical_name",
    "check_tensors",
    "select_tensors",
    "unmaterialized",
    "unwrap",
]

_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
BUFFER_POLICIES = ("average", "copy", "ignore")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / DeepSpeed engine / ``torch.compile``
    wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
            continue
        inner = engine_module(model)
        if inner is not None:
            model = inner
            continue
        return model


def canonical_name(name: str) -> str:
    """``name`` without wrapper components or a leading ``module.``.

    >>> canonical_name("module._orig_mod.encoder.weight")
    'encoder.weight'
    """
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


@dataclass
class Entry:
    """One tracked tensor: where it lives in the model and how it is averaged.

    ``mode`` is ``"average"`` or ``"copy"``. ``owner``/``attr`` locate the tensor so that a
    replaced tensor (``model.half()`` replaces buffers) is found again; ``aliases`` are other
    canonical names of the same tensor (tied weights).
    """

    name: str
    owner: nn.Module
    attr: str
    is_param: bool
    mode: str
    aliases: tuple[str, ...] = ()

    def raw(self) -> torch.Tensor:
        """The tensor registered in the module (a DTensor under FSDP2)."""
        table = self.owner._parameters if self.is_param else self.owner._buffers
        return table[self.attr]  # type: ignore[return-value]

    def get(self) -> torch.Tensor:
        """The tensor the kernels read: the local shard of a DTensor, the partition of a ZeRO-3
        parameter, else the tensor itself."""
        return local(self.raw())


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return bool(patterns) and any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _patterns(value: str | Iterable[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in items):
        raise TypeError(f"{what} takes glob patterns (strings), got {value!r}")
    return items


def select_tensors(
    model: nn.Module,
    buffers: str = "average",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[Entry]:
    """The tensors of ``model`` an average tracks, in ``named_parameters``/``named_buffers`` order.

    Floating (and complex) parameters are averaged; floating buffers follow ``buffers``
    (``"average"``, ``"copy"`` or ``"ignore"``); integer tensors (``num_batches_tracked``) are
    copied, never averaged. ``include``/``exclude`` are glob patterns over canonical names.
    """
    if buffers not in BUFFER_POLICIES:
        raise ValueError(f"buffers must be one of {BUFFER_POLICIES}, got {buffers!r}")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    root = unwrap(model)
    entries: dict[int, Entry] = {}
    seen: dict[str, str] = {}
    for is_param in (True, False):
        for mod_name, module in root.named_modules(remove_duplicate=False):
            table = module._parameters if is_param else module._buffers
            for attr, tensor in table.items():
                if tensor is None:
                    continue
                raw = f"{mod_name}.{attr}" if mod_name else attr
                name = canonical_name(raw)
                if name in seen and seen[name] != raw:
                    raise ValueError(
                        f"tensors {seen[name]!r} and {raw!r} have the same canonical name "
                        f"{name!r}; rename one of the modules"
                    )
                seen[name] = raw
                if inc is not None and not _matches(name, inc):
                    continue
                if _matches(name, exc):
                    continue
                if id(tensor) in entries:
                    entry = entries[id(tensor)]
                    if name != entry.name and name not in entry.aliases:
                        entry.aliases += (name,)
                    continue
                floating = tensor.is_floating_point() or tensor.is_complex()
                if not floating:
                    mode = "copy"
                elif is_param or buffers == "average":
                    mode = "average"
                elif buffers == "copy":
                    mode = "copy"
                else:
                    continue
                entries[id(tensor)] = Entry(name, module, attr, is_param, mode)
    found = list(entries.values())
    if not found:
        raise ValueError(
            "no tensor to average: the model has no parameters"
            + ("" if inc is None and exc is None else " matching include/exclude")
        )
    return found


def unmaterialized(name: str, tensor: Any) -> str | None:
    """Why ``tensor`` holds no weights yet (a lazy module's, or on the meta device), or None."""
    if isinstance(tensor, nn.parameter.UninitializedTensorMixin):  # type: ignore[attr-defined]
        return f"{name} is not initialised yet (lazy module): run one forward pass first"
    if tensor.device.type == "meta":
        return (
            f"{name} is on the meta device (no data): materialise the model first "
            "(model.to_empty(device=...) and initialise or load the weights)"
        )
    return None


def check_tensors(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, Any], what: str) -> None:
    """Named error unless ``theirs`` has exactly ``ours``'s names, as tensors of the same shapes."""
    check_names(ours, theirs, what)
    for n, t in ours.items():
        src = theirs[n]
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"{what}: {n} is a {type(src).__name__}, not a tensor")
        if src.shape != t.shape:
            raise ValueError(f"{what}: {n} has shape {tuple(src.shape)}, here {tuple(t.shape)}")
