"""An EMA of the weights in a plain Accelerate loop: ``register_for_checkpointing``, no callback.

The recipe diffusers' training scripts follow with their own EMA class, done with
:class:`polyak.EMA`: build it on the unwrapped model, call ``ema.update()`` after each optimizer
step (``accelerator.sync_gradients`` tells which micro-batch stepped under gradient
accumulation), evaluate inside ``ema.swapped(...)``, and register it with
``accelerator.register_for_checkpointing(ema)`` so ``save_state``/``load_state`` carry the
average and its schedule position. The script stops halfway, saves, rebuilds everything from
scratch, loads the state, finishes, and checks that the result equals an uninterrupted run.

Accelerate writes the EMA's state with ``torch.save`` (``custom_checkpoint_0.pkl``) and reads it
back with ``torch.load(weights_only=False)`` (``load_custom_state`` in Accelerate's
``checkpointing.py``): loading a state folder unpickles it, which can run code, so load only
folders you wrote. ``EMA.load_state_dict`` then checks every field and tensor (a bad state is a
named error and changes nothing). To load without unpickling, save ``ema.state_dict()`` beside
the folder yourself (``torch.save``) and read it with ``torch.load(..., weights_only=True)``:
the state dict is plain tensors and Python data.

    python examples/accelerate_ema.py            # ~10 s on 2 CPU cores
    python examples/accelerate_ema.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.cli.study.data import load_digits


def build(data: TensorDataset) -> tuple[Any, ...]:
    """Accelerator, model, optimizer, EMA and loader, as a fresh process would build them."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(data, batch_size=16)  # a fixed order, so both runs see the same batches
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = polyak.EMA(accelerator.unwrap_model(model), polyak.schedules.warmup(0.99))
    accelerator.register_for_checkpointing(ema)  # save_state/load_state carry it
    return accelerator, model, optimizer, ema, loader


def train(
    accelerator: Any, model: Any, optimizer: Any, ema: Any, loader: Any, epochs: range
) -> None:
    for _ in epochs:
        model.train()
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:  # an optimizer step happened: one EMA update
                ema.update()


@torch.no_grad()
def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return nn.functional.cross_entropy(model(x), y).item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few epochs, for the tests")
    args = parser.parse_args(argv)
    epochs = 4 if args.fast else 20
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    digits = load_digits(seed=0)
    data = TensorDataset(torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train))
    x_val, y_val = torch.from_numpy(digits.x_test), torch.from_numpy(digits.y_test)

    accelerator, model, optimizer, ema, loader = build(data)  # uninterrupted
    train(accelerator, model, optimizer, ema, loader, range(epochs))
    whole = {k: v.clone() for k, v in ema.averaged_tensors().items()}
    live = loss(model, x_val, y_val)
    with ema.swapped(accelerator.unwrap_model(model)) as averaged_model:
        averaged = loss(averaged_model, x_val, y_val)
    print(f"{ema.step} optimizer steps; validation loss live {live:.4f}, EMA {averaged:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        accelerator, model, optimizer, ema, loader = build(data)
        train(accelerator, model, optimizer, ema, loader, range(epochs // 2))
        accelerator.save_state(Path(tmp) / "state")
        print(
            f"saved at step {ema.step}: {sorted(p.name for p in (Path(tmp) / 'state').iterdir())}"
        )
        accelerator, model, optimizer, ema, loader = build(data)  # a new process, in effect
        accelerator.load_state(Path(tmp) / "state")
        train(accelerator, model, optimizer, ema, loader, range(epochs // 2, epochs))
    same = all(torch.equal(v, whole[k]) for k, v in ema.averaged_tensors().items())
    print(f"resumed to step {ema.step}: average equal to the uninterrupted one bit for bit: {same}")
    if not same:
        raise SystemExit("the resumed average differs")
    return {"live": live, "ema": averaged}


if __name__ == "__main__":
    main()
