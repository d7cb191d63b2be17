"""The study's small networks: a BatchNorm MLP and a small CNN."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["make_model"]


def make_model(kind: str, num_features: int, num_classes: int) -> nn.Module:
    """``"mlp"``: features-256-256-classes with BatchNorm; ``"cnn"``: two conv blocks (square
    single-channel images of ``num_features`` pixels).
    """
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(num_features, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, num_classes),
        )  # fmt: skip
    side = math.isqrt(num_features)
    if side * side != num_features or side % 4:
        raise ValueError(f"the cnn needs square images with a side divisible by 4, got {side}")
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (side // 4) ** 2, num_classes),
    )  # fmt: skip


def seeded_sgd(cfg: Any, split: Any, seed: int) -> tuple[nn.Module, torch.optim.SGD, int, int]:
    """One seed's model and optimizer as every section of the study trains them (torch seeded
    first, so the same seed gives the same initial weights everywhere), with the optimizer
    steps per epoch and in all."""
    torch.manual_seed(seed)
    model = make_model(cfg.model, split.x_train.shape[1], split.num_classes)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
        weight_decay=cfg.weight_decay,
    )  # fmt: skip
    steps_per_epoch = math.ceil(len(split.x_train) / cfg.batch_size)
    return model, opt, steps_per_epoch, cfg.epochs * steps_per_epoch


def cosine_lr(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The study's learning rate: a cosine from the base rate to 0 over ``total`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
