"""Train with an EMA of the weights and compare raw vs EMA validation loss on digits.

The seed recipe: a small BatchNorm MLP on scikit-learn's bundled digits, SGD with a constant
learning rate, and ``polyak.train_with_ema``, which updates the average after every optimizer
step and evaluates the live (raw) and the averaged weights after every epoch. At the end the
model holds the averaged weights (the common recipe), with BatchNorm statistics recomputed.

    python examples/train_with_ema.py            # ~10 s on 2 CPU cores
    python examples/train_with_ema.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.cli.study.data import load_digits
from polyak.workflows import evaluate, train_with_ema


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few epochs, for the tests")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay per optimizer step")
    parser.add_argument("--lr", type=float, default=0.2)
    args = parser.parse_args(argv)
    epochs = args.epochs or (4 if args.fast else 20)

    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    torch.manual_seed(0)
    data = load_digits(seed=0)
    train = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
    val = TensorDataset(torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    train_loader = DataLoader(
        train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val_loader = DataLoader(val, batch_size=256)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    criterion = nn.CrossEntropyLoss()

    history = train_with_ema(
        model,
        train_loader,
        val_loader,
        optimizer,
        criterion,
        epochs,
        ema_decay=args.decay,  # half-life ln(2)/(1-decay) ~ 69 steps ~ 1.7 epochs at 0.99
        metrics={"accuracy": polyak.metrics.accuracy},
        recompute_bn=True,  # BatchNorm statistics of the average, before each evaluation
    )

    print(f"digits: {len(train)} train / {len(val)} validation; EMA decay {args.decay}")
    print("epoch  train_loss  val_loss raw  val_loss EMA  val_acc raw  val_acc EMA")
    for i, epoch in enumerate(history["epoch"]):
        print(
            f"{epoch:5d}  {history['train_loss'][i]:10.4f}  {history['val_loss'][i]:12.4f}  "
            f"{history['val_loss_ema'][i]:12.4f}  {history['val_accuracy'][i]:11.3f}  "
            f"{history['val_accuracy_ema'][i]:11.3f}"
        )
    raw, avg = history["val_loss"][-1], history["val_loss_ema"][-1]
    print(f"final validation loss: raw {raw:.4f}, EMA {avg:.4f} ({100 * (avg - raw) / raw:+.1f}%)")
    for key in ("val_loss", "val_loss_ema"):
        best = min(range(epochs), key=history[key].__getitem__)
        print(f"best {key}: {history[key][best]:.4f} at epoch {best + 1}")
    final = evaluate(model, val_loader, criterion)
    print(f"the model now holds the EMA weights: validation loss {final:.4f}")
    return history


if __name__ == "__main__":
    main()
