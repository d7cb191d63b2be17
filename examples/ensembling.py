"""Checkpoint ensembling vs weight averaging on digits.

One training run with a constant, high learning rate saves a checkpoint (a state dict) at the end
of each of its last ``K`` epochs and keeps an EMA of the weights. Then it compares, on the
validation set:

* the last checkpoint;
* the ensemble of the ``K`` checkpoints: their predicted probabilities averaged
  (``polyak.ensemble_predictions``), ``K`` forward passes per prediction;
* the uniform average of the same ``K`` checkpoints' weights (SWA-like), one forward pass, with
  BatchNorm statistics recomputed for it (``polyak.recompute_bn``);
* the EMA of the weights over the whole run (statistics recomputed as well).

    python examples/ensembling.py            # ~10 s on 2 CPU cores
    python examples/ensembling.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.cli.study.data import load_digits
from polyak.workflows import ensemble_predictions, recompute_bn


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few epochs, for the tests")
    parser.add_argument("--checkpoints", type=int, default=5, help="K: checkpoints to combine")
    args = parser.parse_args(argv)
    epochs, k = (4, 3) if args.fast else (20, args.checkpoints)

    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    torch.manual_seed(0)
    data = load_digits(seed=0)
    train = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
    val = TensorDataset(torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    gen = torch.Generator().manual_seed(0)
    train_loader = DataLoader(train, batch_size=32, shuffle=True, generator=gen)
    val_loader = DataLoader(val, batch_size=256)  # fixed order: members must agree on it

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    ema = polyak.EMA(model, decay=0.99)
    checkpoints: list[dict[str, torch.Tensor]] = []
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            ema.update()
        if epoch > epochs - k:
            checkpoints.append({n: t.detach().clone() for n, t in model.state_dict().items()})

    def report(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {
            "nll": polyak.metrics.nll(probs, labels),
            "accuracy": polyak.metrics.accuracy(probs, labels),
            "ece": polyak.metrics.ece(probs, labels),
        }

    results = {}
    probs, labels = ensemble_predictions(checkpoints[-1:], val_loader, model=make_model())
    assert labels is not None
    results["last checkpoint"] = report(probs, labels)
    probs, _ = ensemble_predictions(checkpoints, val_loader, model=make_model())
    results[f"ensemble of {k}"] = report(probs, labels)

    mean = {}  # uniform average of the same checkpoints' weights; counters copied
    for name, last in checkpoints[-1].items():
        mean[name] = sum(c[name] for c in checkpoints) / k if last.is_floating_point() else last
    averaged = make_model()
    averaged.load_state_dict(mean)
    recompute_bn(averaged, train_loader)
    probs, _ = ensemble_predictions([averaged], val_loader)
    results[f"weight average of {k}"] = report(probs, labels)

    recompute_bn(ema.get_module(), train_loader)  # writes the EMA's own BatchNorm statistics
    probs, _ = ensemble_predictions([ema.get_module()], val_loader)
    results["EMA (decay 0.99)"] = report(probs, labels)

    print(f"digits: {len(train)} train / {len(val)} validation, {epochs} epochs at lr 0.3")
    print(f"{'weights':22s}  forward passes  val NLL  accuracy    ECE")
    for name, r in results.items():
        passes = k if name.startswith("ensemble") else 1
        print(f"{name:22s}  {passes:14d}  {r['nll']:7.4f}  {r['accuracy']:8.3f}  {r['ece']:.4f}")
    return results


if __name__ == "__main__":
    main()
