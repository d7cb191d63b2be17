"""``polyak.recompute_bn``: BatchNorm running statistics recomputed for (averaged) weights."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from polyak.workflows._common import (
    Forward,
    check_count,
    check_forward,
    check_loader,
    check_module,
    default_forward,
    eval_mode,
    model_device,
    to_device,
)

__all__ = ["recompute_bn"]

BNState = list[tuple[_BatchNorm, torch.Tensor, torch.Tensor, torch.Tensor | None]]


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers of ``model`` that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
    ]


def save_bn(layers: list[_BatchNorm]) -> BNState:
    """Copies of the layers' running statistics (a few vectors per layer)."""
    return [
        (
            m,
            m.running_mean.clone(),  # type: ignore[union-attr]
            m.running_var.clone(),  # type: ignore[union-attr]
            None if m.num_batches_tracked is None else m.num_batches_tracked.clone(),
        )
        for m in layers
    ]


@torch.no_grad()
def load_bn(state: BNState) -> None:
    """Write saved statistics back, in place (so views into an EMA's storage stay views)."""
    for m, mean, var, count in state:
        m.running_mean.copy_(mean)  # type: ignore[union-attr]
        m.running_var.copy_(var)  # type: ignore[union-attr]
        if count is not None and m.num_batches_tracked is not None:
            m.num_batches_tracked.copy_(count)


@torch.no_grad()
def recompute_bn(
    model: nn.Module,
    loader: Iterable[object],
    num_batches: int | None = None,
    forward: Forward | None = None,
    *,
    device: torch.device | str | None = None,
    sync: bool | None = None,
) -> nn.Module:
    """Reset every BatchNorm layer's running statistics and recompute them over ``loader``.

    Averaged weights need their own BatchNorm statistics: the live model's (or an average of
    them) describe the activations of other weights, and the longer the averaging window the
    worse they fit. This runs the data through the model in train mode with ``momentum=None``,
    so that after ``k`` batches each layer holds the cumulative average of its batch statistics:

        running_mean = (1/k) * sum_b mean_b(x)
        running_var  = (1/k) * sum_b var_b(x)      (unbiased batch variance, n_b - 1)

    (the semantics of ``torch.optim.swa_utils.update_bn``; every batch weighs the same, so a short
    last batch counts as much as a full one: use ``drop_last=True`` or ``num_batches`` to avoid
    it). The statistics are written in place, so on ``ema.get_module()`` or inside
    ``with ema.swapped(model):`` they land in the EMA's storage and the live model's are left
    alone. Afterwards every layer gets its momentum and every submodule its training flag back;
    if the pass fails, the old statistics are restored as well. Gradients are not computed.

    Under ``torch.distributed`` (DDP without SyncBatchNorm: each rank sees its own batches) the
    statistics are then all-reduced, weighted by each rank's batch count, so that every rank
    holds the same BatchNorm state: the cumulative average over all ranks' batches.

    Args:
        model: the model whose BatchNorm statistics to recompute (e.g. ``ema.get_module()``).
        loader: training batches: tensors, ``(inputs, ...)`` tuples (``model(inputs)``; longer
            tuples pass all but the last element) or dicts (``model(**batch)``).
        num_batches: use only the first ``num_batches`` batches (default: all of them).
        forward: ``forward(model, batch)`` for other layouts; its return value is ignored.
        device: where to move the batches (default: the device of the model's first parameter).
        sync: all-reduce the statistics across ranks; default: when ``torch.distributed`` is
            initialised with more than one rank. Every rank must then call this function.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: the loader yields no batch, or ``num_batches`` is not a positive integer.
        TypeError: ``model`` is not a module, ``loader`` not iterable, ``forward`` not callable.

    Examples:
        >>> import torch, polyak
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> ema = polyak.EMA(model, decay=0.999)
        >>> train_loader = [torch.randn(16, 3) for _ in range(4)]
        >>> for x in train_loader:  # training: an optimizer step, then ema.update()
        ...     _ = model(x)
        ...     ema.update()
        >>> averaged = ema.get_module()  # the averaged weights, in the EMA's storage
        >>> _ = polyak.recompute_bn(averaged, train_loader)  # their own statistics
        >>> with ema.swapped(model):  # or in place, in the EMA's storage
        ...     _ = polyak.recompute_bn(model, train_loader, num_batches=2)

    References:
        Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
        UAI 2018 (BN statistics recomputed after SWA); Morales-Brotons, Vogels & Hendrikx, TMLR
        2024, Sec. 3.4 and Table 24 (recomputing helps every EMA, and long windows need it).
    """
    check_module(model)
    check_loader(loader)
    num_batches = check_count(num_batches, "num_batches", allow_none=True)
    check_forward(forward)
    layers = batchnorms(model)
    if not layers:
        warnings.warn(
            f"{type(model).__name__} has no BatchNorm layer with running statistics; "
            "recompute_bn() has nothing to do",
            UserWarning,
            stacklevel=2,
        )
        return model
    dev = torch.device(device) if device is not None else model_device(model)
    saved = save_bn(layers)
    momenta = [m.momentum for m in layers]
    try:
        with eval_mode(model, training=True):
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: factor 1/num_batches_tracked
            seen = 0
            for batch in itertools.islice(loader, num_batches):
                batch = to_device(batch, dev)
                if forward is None:
                    default_forward(model, batch)
                else:
                    forward(model, batch)
                seen += 1
            if seen == 0:
                raise ValueError("the loader yielded no batch: BatchNorm statistics unchanged")
            if _distributed() if sync is None else sync:
                _all_reduce_stats(layers)
    except BaseException:
        load_bn(saved)
        raise
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
    return model


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_stats(layers: list[_BatchNorm]) -> None:
    """Average every layer's statistics over all ranks, weighted by its batch count (one call)."""
    counts = [float(m.num_batches_tracked) for m in layers]  # type: ignore[arg-type]
    parts = []
    for m, c in zip(layers, counts):
        parts += [m.running_mean.double() * c, m.running_var.double() * c]  # type: ignore[union-attr]
    flat = torch.cat([*parts, torch.tensor(counts, dtype=torch.float64, device=parts[0].device)])
    torch.distributed.all_reduce(flat)
    totals = flat[-len(layers) :]
    offset = 0
    for i, m in enumerate(layers):
        n = m.running_mean.numel()  # type: ignore[union-attr]
        total = totals[i].clamp_min(1.0)
        m.running_mean.copy_(flat[offset : offset + n] / total)  # type: ignore[union-attr]
        m.running_var.copy_(flat[offset + n : offset + 2 * n] / total)  # type: ignore[union-attr]
        m.num_batches_tracked.fill_(int(totals[i].item()))  # type: ignore[union-attr]
        offset += 2 * n
