"""Early stopping over the live weights and the EMA, with noisy labels on digits.

30% of the training labels are flipped to another class, so the live weights soon start to
memorise the noise and their validation loss climbs; the EMA holds out longer. One
``polyak.EarlyStopping`` watches the validation loss of both, keeps a copy of the best weights
(whichever they are), stops after ``patience`` epochs without improvement, and restores them.
The best epoch of each is printed: the averaged weights peak well before the end of a long run
(Morales-Brotons et al., TMLR 2024).

    python examples/early_stopping.py            # ~10 s on 2 CPU cores
    python examples/early_stopping.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.cli.study.data import flip_labels, load_digits
from polyak.workflows import EarlyStopping, evaluate, train_with_ema


def main(argv: list[str] | None = None) -> EarlyStopping:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a short run, for the tests")
    parser.add_argument("--noise", type=float, default=0.3, help="share of flipped labels")
    parser.add_argument("--patience", type=int, default=None)
    args = parser.parse_args(argv)
    epochs, patience = (6, 2) if args.fast else (60, 10)
    patience = args.patience or patience

    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    torch.manual_seed(0)
    data = load_digits(seed=0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.x_train))
    fit, hold = order[: len(order) * 4 // 5], order[len(order) * 4 // 5 :]
    noisy, flipped = flip_labels(data.y_train, args.noise, 10, seed=1)

    def tensors(x, y):
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    train = tensors(data.x_train[fit], noisy[fit])  # noisy labels to learn from
    val = tensors(data.x_train[hold], noisy[hold])  # noisy too: all one has in practice
    test = tensors(data.x_test, data.y_test)  # clean labels, used once at the end
    loader = DataLoader(
        train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val_loader, test_loader = DataLoader(val, batch_size=256), DataLoader(test, batch_size=256)

    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    stopper = EarlyStopping(patience=patience, monitor="val_loss")
    history = train_with_ema(
        model, loader, val_loader, optimizer, criterion, epochs,
        ema_decay=0.995,  # half-life ~138 steps ~ 3.5 epochs
        early_stopping=stopper, final_weights="best",
    )  # fmt: skip

    sizes = f"train {len(train)}, validation {len(val)}, test {len(test)}"
    print(f"digits, {int(flipped.sum())} of {len(noisy)} training labels flipped; {sizes}")
    print("epoch  val_loss live  val_loss EMA")
    for i, epoch in enumerate(history["epoch"]):
        print(f"{epoch:5d}  {history['val_loss'][i]:13.4f}  {history['val_loss_ema'][i]:12.4f}")
    ran = history["epoch"][-1]
    stop = f"stopped after epoch {stopper.stopped_epoch}" if stopper.stopped_epoch else "no stop"
    print(f"{stop} (patience {patience}, {ran} of {epochs} epochs run)")
    for which, best in stopper.best_by_candidate.items():
        print(f"best {which}: val loss {best.value:.4f} at epoch {best.epoch}")
    best = stopper.best
    assert best is not None
    print(f"restored: the {best.which} weights of epoch {best.epoch} (val loss {best.value:.4f})")
    test_loss = evaluate(model, test_loader, criterion, metrics={"acc": polyak.metrics.accuracy})
    print(f"test (clean labels): loss {test_loss['loss']:.4f}, accuracy {test_loss['acc']:.3f}")
    return stopper


if __name__ == "__main__":
    main()
