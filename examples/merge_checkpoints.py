"""Merge a run's saved checkpoints instead of decaying its learning rate (polyak.merge).

    python examples/merge_checkpoints.py            # digits, 30 epochs
    python examples/merge_checkpoints.py --fast     # a few seconds

An MLP is trained on scikit-learn's digits with SGD at a constant learning rate, saving a
checkpoint (a safetensors file with its step in the metadata) every few steps, as a trainer
would. The same run is continued from 80% of its steps with the rate decayed linearly to zero
(warmup-stable-decay), for comparison. Then the constant run's checkpoints are merged with
``polyak.merge``: WSM's weights for that decay, LAWA (the last few), an EMA-equivalent merge,
and a greedy soup of three fine-tuned copies scored on the validation split. Each merge is
streamed from the files and written in the Hugging Face layout; the script prints validation
and test accuracy of each, and the weights of the WSM merge per checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import polyak
from polyak.merge import weights


def data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0)
    x_tr, x_va, y_tr, y_va = train_test_split(x_tr, y_tr, test_size=0.2, random_state=0)
    return {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": (x_te, y_te)}


def accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return (model(split[0]).argmax(1) == split[1]).double().mean().item()


def train(model, opt, steps, batches, split, rate, save=None):
    model.train()
    for t in steps:
        for group in opt.param_groups:
            group["lr"] = 0.2 * rate(t)
        idx = batches[t]
        loss = nn.functional.cross_entropy(model(split[0][idx]), split[1][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if save is not None:
            save(t + 1, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="8 epochs: a few seconds")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    d = data()
    epochs = 8 if args.fast else 30
    gen = torch.Generator().manual_seed(0)
    orders = [torch.randperm(len(d["train"][1]), generator=gen) for _ in range(epochs)]
    batches = [b for order in orders for b in order.split(32)]
    total = len(batches)
    window = total // 5
    n = total - window
    every = max(1, window // 10)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths: list[Path] = []

        def save(step: int, m: nn.Module) -> None:
            if (step >= n - 2 * window and (step - n) % every == 0) or step == total:
                paths.append(root / f"step{step:05d}.safetensors")
                save_file(m.state_dict(), paths[-1], metadata={"step": str(step)})

        train(model, opt, range(n), batches, d["train"], lambda t: 1.0, save)
        decayed = copy.deepcopy(model)
        decayed_opt = torch.optim.SGD(decayed.parameters(), lr=0.2, momentum=0.9)
        decayed_opt.load_state_dict(opt.state_dict())
        train(model, opt, range(n, total), batches, d["train"], lambda t: 1.0, save)
        train(decayed, decayed_opt, range(n, total), batches, d["train"],
              lambda t: 1.0 - (t - n) / window)  # fmt: skip

        sources = polyak.merge.open_sources(paths)  # headers only: names, shapes, steps
        steps = [s.step for s in sources]
        for s in sources:
            s.close()
        inside = [i for i, s in enumerate(steps) if s >= n]
        wsm = weights.wsm([steps[i] for i in inside], "linear", window=window)
        candidates = {
            "WSM (linear decay)": ([paths[i] for i in inside], wsm),
            "LAWA (last 4)": (paths, weights.lawa(steps, 4)),
            "EMA 0.98": (paths, weights.ema(steps, 0.98)),
        }  # fmt: skip
        rows = {"constant rate, last step": model, "decayed rate (WSD)": decayed}
        for name, (chosen, w) in candidates.items():
            out = root / name.split()[0]
            polyak.merge.merge(chosen, w, out)
            merged = copy.deepcopy(model)
            merged.load_state_dict(load_file(out / "model.safetensors"))
            rows[name] = merged
        # a greedy soup: three fine-tuned copies of the last checkpoint, scored on validation
        scorer_model = copy.deepcopy(model)

        def val_accuracy(state: dict[str, torch.Tensor]) -> float:
            scorer_model.load_state_dict(state)
            return accuracy(scorer_model, d["val"])

        ingredients = []
        for seed in range(3):
            torch.manual_seed(100 + seed)
            tuned = copy.deepcopy(decayed)
            tuned_opt = torch.optim.SGD(tuned.parameters(), lr=0.02 * (seed + 1))
            order = torch.randperm(len(d["train"][1])).split(32)
            train(tuned, tuned_opt, range(len(order)), list(order), d["train"], lambda t: 1.0)
            ingredients.append(root / f"tuned{seed}.safetensors")
            save_file(tuned.state_dict(), ingredients[-1])
        soup = polyak.merge.greedy_soup(ingredients, val_accuracy, root / "soup")
        souped = copy.deepcopy(model)
        souped.load_state_dict(load_file(root / "soup" / "model.safetensors"))
        rows[f"greedy soup ({len(soup.kept)} of 3 fine-tuned)"] = souped

        print(f"digits, {epochs} epochs ({total} steps), decay over the last {window}; "
              f"{len(paths)} checkpoints, one every {every} steps")  # fmt: skip
        print(f"{'weights':<34} {'val acc':>8} {'test acc':>9}")
        for name, m in rows.items():
            print(f"{name:<34} {accuracy(m, d['val']):>8.3f} {accuracy(m, d['test']):>9.3f}")
        w = candidates["WSM (linear decay)"][1]
        shown = ", ".join(f"{s}: {x:.3f}" for s, x in zip(w.steps or (), w) if x)
        print(f"WSM weights per checkpoint step: {shown}")
        assert math.isclose(sum(w), 1.0)


if __name__ == "__main__":
    main()
