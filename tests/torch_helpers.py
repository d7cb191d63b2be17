"""Small models and weight streams for the torch tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx))


def float_state(model: nn.Module) -> dict[str, np.ndarray]:
    """float64 NumPy copies of every floating tensor (params and buffers) by name."""
    return {
        k: v.detach().double().cpu().numpy()
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


def randomize_(model: nn.Module, gen: torch.Generator, scale: float = 0.1) -> None:
    """Move every floating tensor by noise, like an optimizer step would (also BN stats)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                t.add_((scale * noise).to(t.dtype))
            else:
                t.add_(1)
