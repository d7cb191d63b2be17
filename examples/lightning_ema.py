"""An EMA of the weights in a Lightning ``Trainer.fit``: one callback, both weight sets logged.

A BatchNorm MLP on scikit-learn's bundled digits, SGD with a constant learning rate and
``accumulate_grad_batches=2``. ``EMACallback(evaluate="both")`` updates the average after every
optimizer step and validates the live and the averaged weights every epoch (``val_loss`` and
``val_loss_ema``); ``ModelCheckpoint`` keeps the checkpoint with the best averaged loss, and
``save_average_as_weights=True`` makes that checkpoint's weights the average, so
``load_from_checkpoint`` gives the averaged model for inference.

    python examples/lightning_ema.py            # ~15 s on 2 CPU cores
    python examples/lightning_ema.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polyak.cli.study.data import load_digits
from polyak.integrations.lightning import EMACallback


class Digits(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    test_step = validation_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class History(L.Callback):
    """Both weight sets' metrics after each validation (this callback runs once per epoch)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.rows.append({k: v.item() for k, v in trainer.callback_metrics.items()})


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few epochs, for the tests")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--decay", type=float, default=0.98, help="EMA decay per optimizer step")
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.fast else 15)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    L.seed_everything(0, verbose=False)

    data = load_digits(seed=0)
    train = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
    val = TensorDataset(torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    train_loader = DataLoader(train, batch_size=16, shuffle=True)
    val_loader = DataLoader(val, batch_size=256)

    ema = EMACallback(decay=args.decay, evaluate="both", save_average_as_weights=True)
    history = History()
    with tempfile.TemporaryDirectory() as tmp:
        best = ModelCheckpoint(tmp, monitor="val_loss_ema", filename="best")
        trainer = L.Trainer(
            max_epochs=epochs,
            accumulate_grad_batches=2,  # one EMA update per optimizer step, not per batch
            callbacks=[history, ema, best],
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Digits(lr=0.1), train_loader, val_loader)
        print(f"digits: {len(train)} train / {len(val)} validation; EMA decay {args.decay}")
        print(f"{ema.ema.step} optimizer steps ({trainer.global_step} by Lightning's count)")
        print("epoch  val_loss live  val_loss EMA  val_acc live  val_acc EMA")
        for i, row in enumerate(history.rows, 1):
            print(
                f"{i:5d}  {row['val_loss']:13.4f}  {row['val_loss_ema']:12.4f}  "
                f"{row['val_acc']:12.3f}  {row['val_acc_ema']:11.3f}"
            )
        # the best checkpoint's weights are the average: plain Lightning loads it for inference
        averaged = Digits.load_from_checkpoint(best.best_model_path)
        (result,) = L.Trainer(logger=False, enable_progress_bar=False).test(
            averaged, val_loader, verbose=False
        )
    print(
        f"best checkpoint by val_loss_ema ({best.best_model_score:.4f}), loaded with "
        f"load_from_checkpoint: test loss {result['val_loss']:.4f}, accuracy "
        f"{result['val_acc']:.3f}"
    )
    return history.rows


if __name__ == "__main__":
    main()
