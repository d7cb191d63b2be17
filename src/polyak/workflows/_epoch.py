"""One epoch of :func:`polyak.train_with_ema`: the training pass and the evaluations."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from polyak._torch.ema import EMA
from polyak.workflows._common import (
    Forward,
    accumulator,
    loss_sum,
    need_target,
    num_rows,
    run_forward,
    to_device,
)
from polyak.workflows.bn import BNState, batchnorms, load_bn, recompute_bn, save_bn
from polyak.workflows.evaluate import Metric, evaluate
from polyak.workflows.progress import Progress

__all__ = ["evaluate_all", "evaluate_average", "length", "train_epoch"]


def length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def train_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    criterion: Callable[..., torch.Tensor],
    ema: EMA,
    k: int,
    scheduler: Any,
    forward: Forward | None,
    dev: torch.device | None,
    bar: Progress,
    check_loss: bool = False,
    after_step: Callable[[], Any] | None = None,
) -> tuple[float, int | None]:
    """One pass over ``loader``: the size-weighted mean training loss, and with ``check_loss``
    the 1-based index of the batch whose loss was not finite (the pass stopped there, before
    its backward: the weights are those of the last step), else ``None``."""
    model.train()
    total, seen = accumulator(dev), 0
    micro, group_rows, summed = 0, 0, False
    for index, batch in enumerate(loader, 1):
        batch = to_device(batch, dev)
        outputs, target = run_forward(model, batch, forward)
        target = need_target(target, batch)
        loss = criterion(outputs, target)
        if check_loss and not bool(torch.isfinite(loss.detach()).all()):  # one host sync
            optimizer.zero_grad(set_to_none=True)  # the group's partial gradients go too
            return (float(total) / seen if seen else float("nan")), index
        s, n = loss_sum(loss, num_rows(outputs, target), criterion)
        total += s.detach().to(total.dtype)
        seen += n
        if k == 1:
            (loss if loss.ndim == 0 else loss.mean()).backward()
        else:  # sum over samples now, divide by the group's size at the step (see docstring)
            s.backward()
            summed = loss.ndim == 0 and getattr(criterion, "reduction", "mean") == "sum"
            group_rows += n
        micro += 1
        if micro == k:
            _step(optimizer, ema, scheduler, None if k == 1 or summed else group_rows, after_step)
            micro, group_rows = 0, 0
        bar.update()
    if micro:
        _step(optimizer, ema, scheduler, None if summed else group_rows, after_step)
    if seen == 0:
        raise ValueError("train_loader yielded no sample")
    return float(total) / seen, None


def _step(
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    scheduler: Any,
    rows: int | None,
    after_step: Callable[[], Any] | None = None,
) -> None:
    """Optimizer step (gradients divided by ``rows`` first, if given), then the average (and
    ``after_step``, e.g. a write-back)."""
    if rows:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        dense = [g for g in grads if not g.is_sparse]
        if dense:
            torch._foreach_mul_(dense, 1.0 / rows)
        for g in grads:
            if g.is_sparse:
                g.mul_(1.0 / rows)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update()
    if after_step is not None:
        after_step()
    if scheduler is not None:
        scheduler.step()


def evaluate_all(
    model: nn.Module,
    loader: Iterable[Any],
    criterion: Callable[..., torch.Tensor],
    fns: Mapping[str, Metric],
    forward: Forward | None,
) -> dict[str, float]:
    out = evaluate(model, loader, criterion, metrics=fns, forward=forward)
    return out if isinstance(out, dict) else {"loss": out}


def evaluate_average(
    model: nn.Module,
    loader: Iterable[Any],
    criterion: Callable[..., torch.Tensor],
    fns: Mapping[str, Metric],
    forward: Forward | None,
    bn_loader: Iterable[Any] | None,
    bn_batches: int | None,
) -> tuple[dict[str, float], BNState | None]:
    """Scores of the weights in ``model`` (an average, swapped in), BatchNorm recomputed first
    if asked; then also the statistics to put back once the caller is done with the model."""
    if bn_loader is None:
        return evaluate_all(model, loader, criterion, fns, forward), None
    saved = save_bn(batchnorms(model))
    try:
        recompute_bn(model, bn_loader, bn_batches, forward)
        return evaluate_all(model, loader, criterion, fns, forward), saved
    except BaseException:
        load_bn(saved)
        raise
