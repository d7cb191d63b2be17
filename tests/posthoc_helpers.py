"""A synthetic weight stream for the post-hoc EMA tests: a drifting random walk on a small model."""

from __future__ import annotations

import torch
from torch import nn


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


class Walk:
    """Moves every float tensor of a model by ``scale * (drift + noise)`` per step.

    The drift is fixed per element, the noise fresh each step (seeded); integer buffers count
    the steps, as BatchNorm's ``num_batches_tracked`` would.
    """

    def __init__(self, model: nn.Module, seed: int = 1, scale: float = 1e-3) -> None:
        self.model = model
        self.gen = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.drift = {
            n: torch.randn(t.shape, generator=self.gen)
            for n, t in model.state_dict().items()
            if t.is_floating_point()
        }

    @torch.no_grad()
    def step(self) -> None:
        for name, t in self.model.state_dict().items():
            if name in self.drift:
                noise = torch.randn(t.shape, generator=self.gen)
                t.add_(self.scale * (self.drift[name] + noise))
            else:
                t.add_(1)


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """All floating tensors of a state dict, in name order, as one float64 vector."""
    return torch.cat(
        [tensors[n].double().ravel() for n in sorted(tensors) if tensors[n].is_floating_point()]
    )


@torch.no_grad()
def set_weights(model: nn.Module, step: int) -> None:
    """Deterministic 'trained' weights of ``step`` (a drift plus noise seeded by the step), so
    that a resumed run sees exactly the weights an uninterrupted one would."""
    for i, t in enumerate(model.state_dict().values()):
        if not t.is_floating_point():
            t.fill_(step)
            continue
        base = torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
        noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(10_000 * step + i))
        t.copy_(base * (1 + 1e-3 * step) + 1e-3 * noise)
