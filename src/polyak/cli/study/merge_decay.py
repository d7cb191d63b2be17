"""The study's "merge instead of decay" section: one run's constant-rate checkpoints, merged.

WSM (Tian et al. 2025) replaces the learning-rate decay at the end of training by a merge of
checkpoints of a run that keeps its rate constant: the merge weights of a decay shape stand for
the decay (:func:`polyak.merge.weights.wsm`). Per seed, on the clean-label split, the study's
model is trained with the study's optimizer at the constant peak rate for the first 80% of the
steps; from there the run forks (same data order): one branch keeps the rate constant and saves
a checkpoint every :data:`SPACING` of the decay window, the other decays it linearly to zero
over the last 20% (a warmup-stable-decay schedule; same number of steps). The constant branch's
checkpoints are then merged with :mod:`polyak.merge` from safetensors files, as a user would:
WSM's weights for that linear decay, LAWA over the window (all its checkpoints, or the latest
half) and EMA-equivalent weights (three decays). Every candidate keeps averaged BatchNorm
statistics, as the study's averages do. The merge is chosen on the validation split (highest mean
validation accuracy over the seeds, then lower NLL) and compared with the decayed run on test.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import polyak
from polyak.cli.study.config import StudyConfig, TrainingDiverged
from polyak.cli.study.models import seeded_sgd

__all__ = ["DECAY_SHARE", "EMA_DECAYS", "merge_run", "summarise_merge"]

DECAY_SHARE = 0.2
"""The share of the steps over which the decayed run decays its rate (linearly to zero)."""
SPACING = 1 / 12
"""Checkpoints of the constant run: one every twelfth of the decay window."""
EMA_DECAYS = (0.98, 0.99, 0.995)
"""Per-step decays of the EMA-equivalent merges (horizons of 50 to 200 steps; the checkpoints
reach back three windows, where the widest has 5% of its weight left)."""
EXPECTATION = (
    "Expected before the runs (pre-registered): the merge chosen on validation is within 0.5 "
    "points of the decayed run's test accuracy, or better, on at least 2 of 3 seeds."
)


def _scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 2048]) for i in range(0, len(x), 2048)])
    nll = nn.functional.cross_entropy(logits, y).item()
    return {"acc": (logits.argmax(1) == y).double().mean().item(), "nll": nll}


def _evaluate(model: nn.Module, split: Any) -> dict[str, float]:
    test, val = _scores(model, split.x_test, split.y_test), _scores(model, split.x_val, split.y_val)
    return {"acc": test["acc"], "nll": test["nll"], "val_acc": val["acc"], "val_nll": val["nll"]}


def merge_run(cfg: StudyConfig, split: Any, seed: int) -> dict[str, Any]:
    """One seed: the forked runs, the merges of the constant branch, every candidate's scores."""
    start = time.perf_counter()
    model, opt, per_epoch, total = seeded_sgd(cfg, split, seed)
    window = max(1, round(DECAY_SHARE * total))
    n = total - window
    every = max(1, round(SPACING * window))
    gen = torch.Generator().manual_seed(20_000 + seed)
    order = [torch.randperm(len(split.x_train), generator=gen) for _ in range(cfg.epochs)]
    batches = [idx for perm in order for idx in perm.split(cfg.batch_size)]

    def train(m: nn.Module, o: torch.optim.Optimizer, steps: range, rate: Any) -> None:
        m.train()
        for t in steps:
            for group in o.param_groups:
                group["lr"] = cfg.lr * rate(t)
            idx = batches[t]
            loss = nn.functional.cross_entropy(m(split.x_train[idx]), split.y_train[idx])
            if not math.isfinite(loss.item()):
                raise TrainingDiverged.at(loss.item(), t // per_epoch + 1, seed, cfg.lr,
                                          "the merge section's classifier")  # fmt: skip
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            keep = (t + 1 - n) % every == 0 or t + 1 == total
            if rate is _constant and keep and t + 1 >= n - 2 * window:
                saved.append((t + 1, {k: v.detach().clone() for k, v in m.state_dict().items()}))

    saved: list[tuple[int, dict[str, torch.Tensor]]] = []
    train(model, opt, range(0, n), _constant)  # checkpoints from two windows before the fork
    decayed = copy.deepcopy(model)
    decayed_opt = torch.optim.SGD(decayed.parameters(), lr=cfg.lr)
    decayed_opt.load_state_dict(opt.state_dict())
    train(model, opt, range(n, total), _constant)
    train(decayed, decayed_opt, range(n, total), lambda t: 1.0 - (t - n) / window)
    trained = time.perf_counter() - start
    out: dict[str, Any] = {"seed": seed, "steps": total, "window": window, "every": every,
                           "checkpoints": len(saved)}  # fmt: skip
    scores = {"decayed run": _evaluate(decayed, split), "constant run": _evaluate(model, split)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="polyak-study-merge-") as tmp:
        scores.update(_merges(Path(tmp), saved, n, window, model, split))
    out.update(scores=scores, seconds={"training": trained, "merging": time.perf_counter() - start})
    return out


def _constant(t: int) -> float:
    return 1.0


def _merges(
    tmp: Path, saved: list[tuple[int, dict[str, torch.Tensor]]], n: int, window: int,
    model: nn.Module, split: Any,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Every merge of the constant branch's checkpoints, through polyak.merge, scored."""
    paths, steps = [], []
    for step, state in saved:
        paths.append(tmp / f"step{step}.safetensors")
        steps.append(step)
        save_file(state, paths[-1])
    inside = [i for i, s in enumerate(steps) if s >= n]  # the fork's checkpoint and after
    w = polyak.merge.weights
    candidates = {
        "WSM (linear decay)": (inside, w.wsm([steps[i] for i in inside], "linear", window=window)),
        "LAWA (window)": (inside, w.lawa(len(inside), len(inside))),
        "LAWA (half window)": (inside, w.lawa(len(inside), len(inside) // 2 + 1)),
    }
    for d in EMA_DECAYS:
        candidates[f"EMA {d:g}"] = (list(range(len(steps))), w.ema(steps, d))
    out = {}
    evaluated = copy.deepcopy(model)
    for name, (chosen, weights) in candidates.items():
        target = tmp / name.replace(" ", "_").replace("(", "").replace(")", "")
        polyak.merge.merge([paths[i] for i in chosen], weights, target)
        evaluated.load_state_dict(load_file(target / "model.safetensors"))
        out[name] = {**_evaluate(evaluated, split), "fit": weights.fit or 0.0}
    return out


def summarise_merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The merge chosen on validation, each candidate's mean and std, and the expectation."""
    names = list(runs[0]["scores"])
    table = {
        m: {k: {"mean": float(np.mean([r["scores"][m][k] for r in runs])),
                "std": float(np.std([r["scores"][m][k] for r in runs]))}
            for k in ("acc", "nll", "val_acc", "val_nll")}
        for m in names
    }  # fmt: skip
    merges = [m for m in names if m not in ("decayed run", "constant run")]
    chosen = max(merges, key=lambda m: (round(table[m]["val_acc"]["mean"], 12),
                                        -table[m]["val_nll"]["mean"]))  # fmt: skip
    gaps = [(r["scores"][chosen]["acc"] - r["scores"]["decayed run"]["acc"]) * 100 for r in runs]
    close = sum(g >= -0.5 for g in gaps)
    needed = math.ceil(2 / 3 * len(runs))
    return {
        "table": table,
        "chosen": chosen,
        "gaps_points": gaps,
        "seeds_within": close,
        "seeds": len(runs),
        "met": close >= needed,
        "needed": needed,
        "first": {k: runs[0][k] for k in ("steps", "window", "every", "checkpoints")},
        "seconds": float(np.mean([sum(r["seconds"].values()) for r in runs])),
    }
