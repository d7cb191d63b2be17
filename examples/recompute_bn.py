"""BatchNorm statistics for averaged weights: averaged, copied, or recomputed.

A BatchNorm network keeps running means and variances of its activations. Averaged weights
produce other activations than the live ones, so neither the live statistics (``buffers="copy"``)
nor their average (``buffers="average"``, EMAN) fit them exactly, and the longer the averaging
window the worse. ``polyak.recompute_bn`` runs training data through the averaged weights with a
cumulative average (torch ``update_bn`` semantics) and writes the statistics into the EMA's own
storage, via ``ema.get_module()`` or inside ``with ema.swapped(model):`` (the live model's
statistics are left alone). Morales-Brotons et al. (TMLR 2024, Table 24) found recomputing
always helps.

    python examples/recompute_bn.py            # ~10 s on 2 CPU cores
    python examples/recompute_bn.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.cli.study.data import load_digits
from polyak.workflows import evaluate, recompute_bn


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few epochs, for the tests")
    parser.add_argument("--decay", type=float, default=0.998)
    args = parser.parse_args(argv)
    epochs = 4 if args.fast else 15

    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    torch.manual_seed(0)
    data = load_digits(seed=0)
    train = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
    val = TensorDataset(torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    gen = torch.Generator().manual_seed(0)
    train_loader = DataLoader(train, batch_size=32, shuffle=True, generator=gen)
    val_loader = DataLoader(val, batch_size=256)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    averaged_stats = polyak.EMA(model, decay=args.decay, buffers="average")
    copied_stats = polyak.EMA(model, decay=args.decay, buffers="copy")

    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()
            averaged_stats.update()
            copied_stats.update()

    metrics = {"accuracy": polyak.metrics.accuracy}
    results = {"live weights": evaluate(model, val_loader, criterion, metrics=metrics)}
    results["EMA, live BN stats"] = evaluate(
        copied_stats.module, val_loader, criterion, metrics=metrics
    )
    results["EMA, averaged BN stats"] = evaluate(
        averaged_stats.module, val_loader, criterion, metrics=metrics
    )
    live_stats = model[1].running_var.clone()
    with copied_stats.swapped(model):  # the same weights, statistics recomputed from 5 batches
        recompute_bn(model, train_loader, num_batches=5)
        results["EMA, recomputed (5 batches)"] = evaluate(
            model, val_loader, criterion, metrics=metrics
        )
    assert torch.equal(model[1].running_var, live_stats)  # the live model kept its own
    recompute_bn(averaged_stats.module, train_loader)  # one pass over all the training data
    results["EMA, recomputed (all)"] = evaluate(
        averaged_stats.module, val_loader, criterion, metrics=metrics
    )

    steps = averaged_stats.step
    half_life = polyak.schedules.decay_to_halflife(args.decay)
    print(f"digits, {epochs} epochs ({steps} steps); EMA decay {args.decay}, "
          f"half-life {half_life:.0f} steps")  # fmt: skip
    print(f"{'weights, BatchNorm statistics':30s}  val loss  accuracy")
    for name, r in results.items():
        print(f"{name:30s}  {r['loss']:8.4f}  {r['accuracy']:8.3f}")
    return results


if __name__ == "__main__":
    main()
