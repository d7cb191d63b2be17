"""Quickstart: keep an EMA of a model's weights in a plain training loop and compare.

Trains a small BatchNorm MLP on scikit-learn's bundled digits with SGD and a high learning rate,
keeping three averages at once, and prints the validation loss and accuracy of the live weights
and of each average after every epoch.

    python examples/quickstart.py            # ~10 s on 2 CPU cores
    python examples/quickstart.py --fast     # a few seconds (used by CI)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import polyak
from polyak.cli.study.data import load_digits


def accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    return (logits.argmax(1) == y).float().mean().item(), loss


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for CI")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.fast else 20)

    torch.manual_seed(0)
    data = load_digits(seed=0)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    xv, yv = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True)

    ema = polyak.EMA(
        model,
        decay={  # several averages in one object, each with its own name
            "ema-0.99": 0.99,  # constant decay: half-life ~69 steps
            "warmup-0.999": polyak.schedules.warmup(0.999),  # TF-style warm-up (n+1)/(n+10)
            "power-0.10": polyak.schedules.power(sigma_rel=0.10),  # EDM2 power average
        },
        buffers="average",  # BatchNorm running stats are averaged too (EMAN)
        dtype=torch.float32,  # averages in fp32 whatever the model's dtype
        update_every=1,  # update after every optimizer step
    )

    results: dict[str, tuple[float, float]] = {}
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update()  # after each optimizer step
        model.eval()
        results = {"live": accuracy_and_loss(model, xv, yv)}
        for name in ema.names:
            with ema.swapped(model, name=name):  # evaluate with the average, then swap back
                results[name] = accuracy_and_loss(model, xv, yv)
        row = "  ".join(f"{k} {acc:.3f}/{loss:.3f}" for k, (acc, loss) in results.items())
        print(f"epoch {epoch:2d}  (val acc/loss)  {row}", flush=True)
    return results


if __name__ == "__main__":
    main()
