"""``polyak.evaluate``: the mean loss of a model over a loader, weighted by batch size."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, overload

import torch
from torch import nn

from polyak.workflows._common import (
    Forward,
    accumulator,
    check_forward,
    check_loader,
    check_module,
    eval_mode,
    loss_sum,
    model_device,
    need_target,
    num_rows,
    run_forward,
    to_device,
)

__all__ = ["Metric", "evaluate"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]
"""``metric(outputs, targets) -> float`` over the whole data set (CPU tensors, detached)."""


def check_metrics(metrics: Any) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a dict {{name: fn(outputs, targets) -> float}}, got "
            f"{type(metrics).__name__}"
        )
    for name, fn in metrics.items():
        if not isinstance(name, str) or not name or name == "loss":
            raise ValueError(
                f"metric names must be non-empty strings other than 'loss', got {name!r}"
            )
        if not callable(fn):
            raise TypeError(f"metric {name!r} must be callable (outputs, targets) -> float")
    return dict(metrics)


@overload
def evaluate(
    model: nn.Module,
    loader: Iterable[object],
    criterion: Callable[..., torch.Tensor],
    device: torch.device | str | None = None,
    *,
    metrics: None = None,
    forward: Forward | None = None,
) -> float: ...


@overload
def evaluate(
    model: nn.Module,
    loader: Iterable[object],
    criterion: Callable[..., torch.Tensor],
    device: torch.device | str | None = None,
    *,
    metrics: Mapping[str, Metric],
    forward: Forward | None = None,
) -> dict[str, float]: ...


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[object],
    criterion: Callable[..., torch.Tensor],
    device: torch.device | str | None = None,
    *,
    metrics: Mapping[str, Metric] | None = None,
    forward: Forward | None = None,
) -> float | dict[str, float]:
    """Mean loss of ``model`` over ``loader``, every sample counting once.

    With ``n_b`` samples and mean loss ``L_b`` in batch ``b``:

        loss = sum_b n_b * L_b / sum_b n_b

    The common recipe averages the batch means instead (``mean_b L_b``), which over-weights the
    samples of a short last batch. A criterion with ``reduction="sum"`` gives batch sums
    (``sum_b L_b / sum_b n_b``), one with ``reduction="none"`` one loss per sample (averaged over
    any further dimensions). The model runs in eval mode under ``torch.no_grad()``; every
    submodule gets its own training flag back afterwards.

    Args:
        model: the model to evaluate, e.g. the live model, ``ema.get_module()``, or the model inside
            ``with ema.swapped(model):``.
        loader: batches ``(inputs, target)`` (see :mod:`polyak.workflows` for the convention).
        criterion: ``criterion(outputs, targets) -> loss``, e.g. ``nn.CrossEntropyLoss()``.
        device: where to move the batches (default: the device of the model's first parameter).
        metrics: ``{name: fn(outputs, targets) -> float}``, computed once over the outputs and
            targets of the whole loader (so ECE or accuracy are not averaged per batch); the
            functions of :mod:`polyak.metrics` take the tensors as they are.
        forward: ``forward(model, batch) -> (outputs, targets)`` for other batch layouts.

    Returns:
        The mean loss as a float; with ``metrics``, ``{"loss": ..., **{name: value}}``.

    Raises:
        ValueError: the loader is empty, or a batch has no target.
        TypeError: a bad argument (named in the message).

    Examples:
        >>> import torch, polyak
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,)))
        >>> model = torch.nn.Linear(3, 2)
        >>> loss = polyak.evaluate(model, DataLoader(data, batch_size=4),
        ...                        torch.nn.CrossEntropyLoss())    # batches of 4, 4 and 2

    References:
        Morales-Brotons, Vogels & Hendrikx, "Exponential Moving Average of Weights in Deep
        Learning: Dynamics and Benefits", TMLR 2024 (raw vs averaged validation loss).
    """
    check_module(model)
    check_loader(loader)
    if not callable(criterion):
        raise TypeError(f"criterion must be callable (outputs, targets) -> loss, got {criterion!r}")
    check_forward(forward)
    fns = check_metrics(metrics)
    dev = torch.device(device) if device is not None else model_device(model)
    total = accumulator(dev)
    count = 0
    outputs_seen: list[torch.Tensor] = []
    targets_seen: list[torch.Tensor] = []
    with eval_mode(model):
        for batch in loader:
            batch = to_device(batch, dev)
            outputs, target = run_forward(model, batch, forward)
            target = need_target(target, batch)
            s, n = loss_sum(criterion(outputs, target), num_rows(outputs, target), criterion)
            total += s.to(total.dtype)
            count += n
            if fns:
                outputs_seen.append(outputs.detach().cpu())
                targets_seen.append(target.detach().cpu())
    if count == 0:
        raise ValueError("the loader yielded no sample: cannot evaluate on an empty data set")
    loss = float(total) / count
    if not fns:
        return loss
    out_all, tgt_all = torch.cat(outputs_seen), torch.cat(targets_seen)
    return {"loss": loss, **{name: float(fn(out_all, tgt_all)) for name, fn in fns.items()}}
