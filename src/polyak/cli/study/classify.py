"""One classification run of the study: live weights vs averages, every epoch and at the end.

A run trains one seed at one label-noise level and records, per epoch, the test accuracy and NLL
of the live weights and of each average (the averages keep averaged BatchNorm statistics, EMAN),
plus the validation accuracy used to pick the best epoch. At the end it measures every model
with its averaged BN statistics and, for the averages, again with BN statistics recomputed on
the training inputs (Morales-Brotons et al. 2024 report both), and the share of the noisy
training labels each model reproduces (memorisation). Final validation accuracy and NLL are
recorded for every model too: the study picks its "best" average on them, never on the test set.
With ``posthoc`` set, a run also keeps a :class:`polyak.PostHocEMA` and sweeps ``sigma_rel``
after training (:mod:`polyak.cli.study.posthoc_sweep`), after everything above is recorded; with
``methods`` set, BEMA averages and a SWAG (:mod:`polyak.cli.study.methods`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import polyak
from polyak import metrics, schedules
from polyak.cli.study.config import StudyConfig, TrainingDiverged
from polyak.cli.study.data import Dataset
from polyak.cli.study.methods import Methods
from polyak.cli.study.models import cosine_lr, seeded_sgd
from polyak.cli.study.posthoc_sweep import Sweep
from polyak.workflows import recompute_bn

__all__ = ["LIVE", "Split", "average_schedules", "make_split", "train_run"]

LIVE = "live"


@dataclass(frozen=True)
class Split:
    """Tensors of one noise level: train/val (noisy labels), test (clean), which were flipped."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    flipped: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def make_split(data: Dataset, noise: float, val_fraction: float, seed: int = 0) -> Split:
    """Hold out a validation share of the training set and flip ``noise`` of all its labels.

    The split and the noise are fixed (``seed``) so that every run of a noise level sees the same
    data and the same wrong labels; runs differ only in initialisation and batch order.
    """
    from polyak.cli.study.data import flip_labels

    if data.num_classes is None:
        raise ValueError(f"{data.name} is a regression set; the study classifies")
    noisy, flipped = flip_labels(data.y_train, noise, data.num_classes, seed)
    order = np.random.default_rng(seed).permutation(len(noisy))
    n_val = max(1, round(val_fraction * len(noisy)))
    val, train = order[:n_val], order[n_val:]

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    return Split(
        t(data.x_train[train]), t(noisy[train]), t(flipped[train]),
        t(data.x_train[val]), t(noisy[val]),
        t(data.x_test), t(data.y_test), data.num_classes,
    )  # fmt: skip


def average_schedules(cfg: StudyConfig) -> dict[str, schedules.Schedule]:
    """The averages of the study, named ``ema 0.999`` etc.

    ``debiased``: the exact copy-initialised debiasing (no leftover weight on the initial
    weights); ``warmup``: TF's ``(1+n)/(10+n)`` cap; ``constant``: the plain decay.
    """
    make: Callable[[float], schedules.Schedule] = {
        "debiased": schedules.debiased,
        "warmup": schedules.warmup,
        "constant": schedules.constant,
    }[cfg.average]
    return {f"ema {d:g}": make(d) for d in cfg.decays}


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.softmax(model(x[i : i + batch]), 1) for i in range(0, len(x), batch)])


def _scores(probs: torch.Tensor, y: torch.Tensor, bins: int) -> dict[str, float]:
    p, labels = probs.double().numpy(), y.numpy()
    return {
        "acc": metrics.accuracy(p, labels),
        "nll": metrics.nll(p / p.sum(1, keepdims=True), labels),
        "ece": metrics.ece(p / p.sum(1, keepdims=True), labels, n_bins=bins, binning="equal_mass"),
    }


def train_run(
    cfg: StudyConfig, split: Split, seed: int, tick: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train one seed; return per-epoch curves, final scores and final test predictions (and,
    with ``cfg.posthoc``, the post-hoc sweep under ``"posthoc"``)."""
    if not cfg.posthoc:
        return _train(cfg, split, seed, tick, None)
    with tempfile.TemporaryDirectory(prefix="polyak-study-posthoc-") as store:
        return _train(cfg, split, seed, tick, Path(store))


def _train(
    cfg: StudyConfig,
    split: Split,
    seed: int,
    tick: Callable[[int], None] | None,
    store: Path | None,
) -> dict[str, Any]:
    model, opt, steps_per_epoch, total = seeded_sgd(cfg, split, seed)
    lr_at = cosine_lr(opt, total)
    ema = polyak.EMA(model, average_schedules(cfg))
    sweep = None if store is None else Sweep(model, store, steps_per_epoch)
    methods = Methods(model, steps_per_epoch, total) if cfg.methods else None
    names = [LIVE, *ema.names]
    gen = torch.Generator().manual_seed(10_000 + seed)
    curves: dict[str, dict[str, list[float]]] = {
        n: {"test_acc": [], "test_nll": [], "val_acc": []} for n in names
    }
    train_loss: list[float] = []

    def evaluate_all(record: Callable[[str, nn.Module], None]) -> None:
        record(LIVE, model)
        for name in ema.names:
            with ema.swapped(model, name=name):
                record(name, model)

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total_loss = 0.0
        for idx in torch.randperm(len(split.x_train), generator=gen).split(cfg.batch_size):
            loss = nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            if not math.isfinite(value := loss.item()):
                raise TrainingDiverged.at(value, epoch, seed, cfg.lr, f"the {cfg.model} classifier")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_at.step()
            ema.update()
            if sweep is not None:
                sweep.update()
            if methods is not None:
                methods.update()
            total_loss += value * len(idx)
        train_loss.append(total_loss / len(split.x_train))

        def record(name: str, m: nn.Module) -> None:
            test = _predict(m, split.x_test)
            c = curves[name]
            c["test_acc"].append((test.argmax(1) == split.y_test).double().mean().item())
            nll = nn.functional.nll_loss(test.clamp_min(1e-12).log(), split.y_test)
            c["test_nll"].append(nll.item())
            c["val_acc"].append(
                (_predict(m, split.x_val).argmax(1) == split.y_val).double().mean().item()
            )

        evaluate_all(record)
        if methods is not None:
            methods.epoch_end(model, ema)
        if tick is not None:
            tick(1)

    final: dict[str, dict[str, float]] = {}
    predictions: dict[str, np.ndarray] = {}
    probabilities: dict[str, np.ndarray] = {}

    def record_final(name: str, m: nn.Module) -> None:
        probs = _predict(m, split.x_test)
        scores = _scores(probs, split.y_test, cfg.ece_bins)
        val = _scores(_predict(m, split.x_val), split.y_val, cfg.ece_bins)
        scores["val_acc"], scores["val_nll"] = val["acc"], val["nll"]
        train_pred = _predict(m, split.x_train).argmax(1)
        flipped = split.flipped
        scores["memorised"] = (
            (train_pred[flipped] == split.y_train[flipped]).double().mean().item()
            if bool(flipped.any()) else float("nan")
        )  # fmt: skip
        final[name] = scores
        predictions[name] = probs.argmax(1).numpy()
        probabilities[name] = probs.numpy()

    evaluate_all(record_final)
    batches = list(split.x_train.split(cfg.batch_size))
    for name in ema.names:  # BN statistics recomputed for each average, on the training inputs
        averaged = ema.averaged_tensors(name)
        saved = {k: v.clone() for k, v in averaged.items() if "running" in k or "batches" in k}
        with ema.swapped(model, name=name):
            recompute_bn(model, batches)
            record_final(f"{name} +bn", model)
        for k, v in saved.items():  # give the average its EMAN statistics back
            averaged[k].copy_(v)
    out: dict[str, Any] = {
        "seed": seed,
        "train_loss": train_loss,
        "curves": curves,
        "final": final,
        "predictions": predictions,
        "probabilities": probabilities,
    }
    if methods is not None:
        out["methods"] = methods.finish(
            model, split, batches, _predict, lambda p, y: _scores(p, y, cfg.ece_bins)
        )  # after everything above: the draws and BN recomputations change nothing recorded
    if sweep is not None:

        def score(m: nn.Module) -> dict[str, float]:
            test = _scores(_predict(m, split.x_test), split.y_test, cfg.ece_bins)
            val = _scores(_predict(m, split.x_val), split.y_val, cfg.ece_bins)
            return {"acc": test["acc"], "nll": test["nll"], "val_acc": val["acc"],
                    "val_nll": val["nll"]}  # fmt: skip

        # the reconstruction of a constant decay is the debiased average: compare like with like
        decays = {f"ema {d:g}": d for d in cfg.decays} if cfg.average == "debiased" else {}
        out["posthoc"] = sweep.finish(model, score, decays, final)
    return out
