"""Shared plumbing of the workflows: batches, devices, training modes and named tensors.

Batch convention (used by every workflow unless a custom ``forward`` is given):

* a tensor ``x`` is an input without a target: ``model(x)``;
* a tuple or list ``(x, y)`` is an input and its target: ``model(x)``, target ``y``; longer
  tuples ``(x1, x2, ..., y)`` pass every element but the last to the model; a 1-tuple ``(x,)``
  (``TensorDataset(x)``) has no target;
* a dict is keyword inputs without a target: ``model(**batch)`` (Hugging Face style).

A custom ``forward(model, batch)`` receives the batch already moved to the device and returns
``(outputs, targets)`` (``targets`` may be ``None`` where no loss is computed).
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from polyak._torch.naming import canonical_name, unwrap

__all__ = [
    "Forward",
    "accumulator",
    "check_count",
    "check_forward",
    "check_loader",
    "check_module",
    "default_forward",
    "eval_mode",
    "loss_sum",
    "model_device",
    "named_tensors",
    "need_target",
    "num_rows",
    "preserved_rng",
    "run_forward",
    "to_device",
]

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, batch) -> (outputs, targets)``; the batch is already on the device."""


def check_module(model: Any, what: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_loader(loader: Any, what: str = "loader") -> Iterable[Any]:
    if isinstance(loader, (str, bytes, torch.Tensor)) or not isinstance(loader, Iterable):
        raise TypeError(
            f"{what} must be an iterable of batches (a DataLoader), got {type(loader).__name__}"
        )
    return loader


def check_forward(forward: Any) -> Forward | None:
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable (model, batch) -> ..., got {forward!r}")
    return forward


def check_count(value: Any, what: str, minimum: int = 1, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter (or buffer); ``None`` for a tensor-free model."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor inside (tuples, lists, named tuples, dicts) on ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """``(outputs, target or None)`` under the batch convention of this module."""
    if isinstance(batch, torch.Tensor):
        return model(batch), None
    if isinstance(batch, Mapping):
        return model(**batch), None
    if isinstance(batch, (list, tuple)):
        if len(batch) == 0:
            raise ValueError("got an empty batch (a tuple/list with no element)")
        if len(batch) == 1:
            return model(batch[0]), None
        return model(*batch[:-1]), batch[-1]
    raise TypeError(
        f"batches must be tensors, tuples/lists (inputs..., target) or dicts, got "
        f"{type(batch).__name__}; pass forward=(model, batch) -> (outputs, targets)"
    )


def run_forward(model: nn.Module, batch: Any, forward: Forward | None) -> tuple[Any, Any]:
    """Outputs and targets of one batch, through ``forward`` when given."""
    if forward is None:
        return default_forward(model, batch)
    result = forward(model, batch)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(
            f"forward(model, batch) must return a pair (outputs, targets), got "
            f"{type(result).__name__}"
        )
    return result


def need_target(target: Any, batch: Any) -> torch.Tensor:
    if target is None:
        raise ValueError(
            f"a {type(batch).__name__} batch has no target to compute a loss with: batches must "
            "be (inputs, target) tuples, or pass forward=(model, batch) -> (outputs, targets)"
        )
    return target


def num_rows(outputs: Any, target: Any) -> int:
    """Number of samples in a batch: the first dimension of the target (else of the outputs)."""
    for t in (target, outputs):
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            return int(t.shape[0])
    raise ValueError(
        "cannot tell the batch size: neither the targets nor the outputs are tensors with a "
        "batch dimension"
    )


def loss_sum(loss: torch.Tensor, rows: int, criterion: Any) -> tuple[torch.Tensor, int]:
    """``(sum of per-sample losses, number of samples)`` of one batch (on the device, in the graph).

    A scalar loss is the batch mean (times ``rows``), or the batch sum when the criterion says
    ``reduction="sum"``; an unreduced loss (``reduction="none"``) gives one value per row, each
    averaged over its remaining dimensions.
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the criterion must return a tensor, got {type(loss).__name__}")
    if loss.ndim == 0:
        if getattr(criterion, "reduction", "mean") == "sum":
            return loss, rows
        return loss * rows, rows
    return loss.reshape(loss.shape[0], -1).mean(1).sum(), int(loss.shape[0])


def accumulator(device: torch.device | None) -> torch.Tensor:
    # float64 sums (MPS has no float64): accumulating on the device avoids a host sync per batch.
    dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64
    return torch.zeros((), dtype=dtype, device=device)


@contextlib.contextmanager
def eval_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in eval (or train) mode; give every submodule its own flag back after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _generators(loader: Any) -> list[torch.Generator]:
    """The random generators a DataLoader draws from when it starts an epoch."""
    found: list[torch.Generator] = []
    for owner in (
        loader,
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


@contextlib.contextmanager
def preserved_rng(loaders: Iterable[Any], device: torch.device | None) -> Iterator[None]:
    """Leave every random stream as it was: the global CPU (and the device's) RNG and the
    loaders' own generators. Evaluating (or recomputing BatchNorm over the training loader, which
    reshuffles it and runs dropout) then does not change how training continues."""
    gens = [g for loader in loaders for g in _generators(loader)]
    states = [g.get_state() for g in gens]
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for g, state in zip(gens, states):
                g.set_state(state)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{canonical name: tensor}`` of the model's parameters and buffers (tied tensors once).

    Reads the modules' tables directly, so it triggers no ``state_dict`` hook (e.g. the warning
    of a model whose averaged weights are swapped in).
    """
    root = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in itertools.chain(root.named_parameters(), root.named_buffers()):
        out[canonical_name(name)] = t
    return out
