"""``polyak.workflows.swag_predictions``: sample models from a :class:`polyak.SWAG`, recompute
their BatchNorm statistics, and average their predictions (Maddox et al. 2019, Sec. 4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn

from polyak._torch.swag import SWAG
from polyak.workflows._common import check_count, check_module
from polyak.workflows.bn import batchnorms, recompute_bn
from polyak.workflows.ensemble import EnsemblePredictions, ensemble_predictions

__all__ = ["swag_predictions"]


@torch.no_grad()
def swag_predictions(
    swag: SWAG,
    model: nn.Module,
    loader: Iterable[object],
    *,
    samples: int = 30,
    bn_loader: Iterable[object] | None = None,
    bn_batches: int | None = None,
    scale: float = 0.5,
    covariance: Literal["low-rank", "diagonal"] = "low-rank",
    generator: torch.Generator | None = None,
    transform: Literal["softmax", "sigmoid", "identity"]
    | Callable[[torch.Tensor], torch.Tensor] = "softmax",
    forward: Callable[[nn.Module, object], object] | None = None,
) -> EnsemblePredictions:
    """The Bayesian model average of SWAG: ``p(x) = (1/S) sum_s p(x | theta_s)``, ``theta_s``
    drawn by :meth:`polyak.SWAG.sample`.

    For each of ``samples`` draws: the draw goes into ``model``, its BatchNorm statistics are
    recomputed over ``bn_loader`` (:func:`polyak.recompute_bn`; needed whenever the model has
    BatchNorm, since the statistics of the live weights do not fit a sample), and its
    predictions on ``loader`` are taken (:func:`polyak.ensemble_predictions`, float64 sums).
    Afterwards, also when a step fails, ``model`` gets back every parameter and buffer it had.

    Args:
        swag: the :class:`polyak.SWAG` of ``model`` (or of a model with the same parameters).
        model: where the draws are put and evaluated.
        loader: evaluation batches, in a fixed order.
        samples: ``S >= 1`` draws (Maddox et al. use 30).
        bn_loader: training batches for the BatchNorm statistics (required if the model has
            BatchNorm layers).
        bn_batches: batches of ``bn_loader`` to use (default: all).
        scale: as in :meth:`polyak.SWAG.sample`.
        covariance: as in :meth:`polyak.SWAG.sample`.
        generator: as in :meth:`polyak.SWAG.sample`.
        transform: as in :func:`polyak.ensemble_predictions`.
        forward: as in :func:`polyak.ensemble_predictions`.

    Returns:
        :class:`polyak.workflows.EnsemblePredictions` (mean probabilities, targets).

    Examples:
        >>> import torch, polyak
        >>> net = torch.nn.Linear(4, 3)
        >>> swag = polyak.SWAG(net, rank=2)
        >>> for _ in range(4):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.1 * torch.randn(3, 4))
        ...     swag.update()
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> from polyak.workflows import swag_predictions
        >>> out = swag_predictions(swag, net, data, samples=3)
        >>> out.probs.shape
        torch.Size([8, 3])
    """
    if not isinstance(swag, SWAG):
        raise TypeError(f"swag must be a polyak.SWAG, got {type(swag).__name__}")
    check_module(model)
    samples = check_count(samples, "samples")
    if batchnorms(model) and bn_loader is None:
        raise ValueError(
            "the model has BatchNorm layers: pass bn_loader= (training batches) so that each "
            "sample gets its own statistics"
        )
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    total: torch.Tensor | None = None
    targets = None
    try:
        for _ in range(samples):
            swag.sample(model, scale=scale, covariance=covariance, generator=generator)
            if bn_loader is not None and batchnorms(model):
                recompute_bn(model, bn_loader, bn_batches, forward)
            out = ensemble_predictions([model], loader, transform=transform, forward=forward)
            probs = out.probs.double()
            total = probs if total is None else total + probs
            targets = out.targets
    finally:
        live = model.state_dict(keep_vars=True)
        for k, v in saved.items():
            live[k].data.copy_(v)
    assert total is not None
    return EnsemblePredictions((total / samples).to(torch.float32), targets)
