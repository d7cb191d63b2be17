"""Beyond the plain EMA on digits: BEMA, a PMA-style write-back, a weighted average and SWAG.

One BatchNorm MLP on scikit-learn's bundled digits, trained three ways from the same seed:

1. with ``polyak.EMA`` keeping a plain EMA, a BEMA average (``polyak.averages.bema``) and a
   polynomially weighted average side by side, and a ``polyak.SWAG`` collecting the weights
   over the second half of training;
2. the same with a PMA-style write-back: a uniform average written into the live weights and
   restarted every 2 epochs (``polyak.workflows.WriteBack(restart=True)``).

Then it prints validation accuracy and NLL of the live weights, each average (BatchNorm
recomputed), the SWA mean and the SWAG ensemble (``polyak.workflows.swag_predictions``).

    python examples/beyond_ema.py            # ~15 s on 2 CPU cores
    python examples/beyond_ema.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak import schedules
from polyak.averages import bema
from polyak.cli.study.data import load_digits
from polyak.workflows import WriteBack, recompute_bn, swag_predictions, train_with_ema


def _scores(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    out = polyak.ensemble_predictions([model], loader)
    probs, labels = out.probs.double().numpy(), out.targets.numpy()
    return polyak.metrics.accuracy(probs, labels), polyak.metrics.nll(probs, labels)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few epochs, for the tests")
    args = parser.parse_args(argv)
    epochs = 4 if args.fast else 16

    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    data = load_digits(seed=0)
    train = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
    val = TensorDataset(torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    val_loader = DataLoader(val, batch_size=256)
    bn_loader = DataLoader(train, batch_size=256)

    def setup() -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        loader = DataLoader(train, batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        return model, opt, loader

    model, opt, loader = setup()
    steps = epochs * len(loader)
    ema = polyak.EMA(model, {"ema 0.99": 0.99, "bema": bema(), "t^2": schedules.polynomial(2.0)})
    swag = polyak.SWAG(model, rank=5, start_step=steps // 2, update_every=len(loader) // 4)

    opt.register_step_post_hook(lambda *_: swag.update())  # SWAG: after every optimizer step
    train_with_ema(model, loader, val_loader, opt, nn.CrossEntropyLoss(), epochs, ema=ema,
                   progress=False, final_weights="live")  # fmt: skip

    results = {"live": _scores(model, val_loader)}
    for name in ema.names:
        with ema.swapped(model, name):  # BEMA: its corrected weights
            recompute_bn(model, bn_loader)
            results[name] = _scores(model, val_loader)
    mean = copy.deepcopy(model)
    swag.sample(mean, scale=0.0)
    recompute_bn(mean, bn_loader)
    results["swa mean"] = _scores(mean, val_loader)
    draws = 4 if args.fast else 16
    gen = torch.Generator().manual_seed(0)
    out = swag_predictions(swag, model, val_loader, samples=draws, bn_loader=bn_loader,
                           generator=gen)  # fmt: skip
    probs, labels = out.probs.double().numpy(), out.targets.numpy()
    results["swag"] = (polyak.metrics.accuracy(probs, labels), polyak.metrics.nll(probs, labels))

    model, opt, loader = setup()
    pma = polyak.EMA(model, schedules.uniform())
    train_with_ema(model, loader, val_loader, opt, nn.CrossEntropyLoss(), epochs, ema=pma,
                   write_back=WriteBack(every=2, unit="epochs", restart=True), progress=False,
                   final_weights="live")  # fmt: skip
    results["pma write-back (live)"] = _scores(model, val_loader)

    print(f"digits, {epochs} epochs; validation accuracy and NLL")
    for name, (acc, nll) in results.items():
        print(f"  {name:22s} {acc:.3f}  {nll:.3f}")
    print(
        f"SWAG: {swag.collected} models collected, {swag.nbytes / 2**10:.0f} KiB for K={swag.rank}"
    )
    return results


if __name__ == "__main__":
    main()
