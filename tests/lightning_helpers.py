"""A tiny LightningModule, its data and a quiet Trainer for the Lightning callback tests (also
imported by the spawned DDP / FSDP2 workers)."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


class Regression(L.LightningModule):
    """Linear-BatchNorm-ReLU-Linear on a linear target: BatchNorm so buffers are averaged
    (running statistics) and copied (``num_batches_tracked``) too."""

    def __init__(
        self, seed: int = 0, lr: float = 0.05, shard: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.lr, self.shard, self.dropout = lr, shard, dropout
        self.seen: list[tuple[bool, int, torch.Tensor]] = []  # (sanity check, step, weight)

    def configure_model(self) -> None:
        if self.shard:  # FSDP2 under ModelParallelStrategy
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net[0])
            fully_shard(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dropout:  # one call of the root: FSDP2 gathers in its forward hook
            return self.net(x)
        hidden = nn.functional.dropout(self.net[:3](x), self.dropout, self.training)
        return self.net[3](hidden)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.seen.append(
            (self.trainer.sanity_checking, self.trainer.global_step, self.net[3].weight.clone())
        )
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(batches: int, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """``batches`` batches of a noisy linear target, in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(len(x), 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(**kwargs: Any) -> L.Trainer:
    """A CPU Trainer that prints and writes nothing unless asked."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return L.Trainer(**options)


class Record(L.Callback):
    """Copies of the live weights (buffers too) after each optimizer step that changed the
    parameters: what an EMA updated after every real optimizer step sees."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.states = [_clone(pl_module)]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        last = self.states[-1]
        if any(not torch.equal(p, last[k]) for k, p in pl_module.named_parameters()):
            self.states.append(_clone(pl_module))


def _clone(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
