"""Remaining useful life on C-MAPSS: a small 1-D CNN, live weights vs averages of them.

One run (:func:`train_rul_seed`) trains the CNN with Adam on the training windows through
:func:`polyak.train_with_ema`, keeping three averages of the weights: a constant decay of 0.999
per step (the course recipe this task checks: "EMA typically reduces RMSE by 2-5%"), the TF
warm-up to 0.999 and EDM2's power average with ``sigma_rel = 0.10``. After every epoch the live
weights and each average are scored on the validation units (RMSE over all their windows) and on
the test units; one :class:`polyak.EarlyStopping` over the validation RMSE stops the run once no
candidate has improved for ``patience`` epochs, and each candidate's epoch is its own best
*validation* epoch. The test scores of other epochs are kept for the plot only.

:func:`summarise_rul` compares the candidates over seeds: test RMSE and PHM08 score at the chosen
epochs, the relative RMSE change of each average against the live weights of the same seed, its
spread, and the average chosen on validation (lowest mean validation RMSE).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak import metrics, schedules
from polyak.cli.study.rul_prep import RulData

__all__ = [
    "COURSE",
    "LIVE",
    "average_schedules",
    "make_rul_model",
    "phm08_score",
    "summarise_rul",
    "train_rul_seed",
]

LIVE = "live"
COURSE = "ema 0.999"  # the course's average: constant decay 0.999 per step, from the start


def average_schedules() -> dict[str, schedules.Schedule]:
    """The averages of every run: the course's constant 0.999, the TF warm-up to 0.999
    (``min(0.999, (1 + t) / (10 + t))``) and the power average with ``sigma_rel = 0.10``
    (Karras et al., CVPR 2024), whose window grows with the run."""
    return {
        COURSE: schedules.constant(0.999),
        "warmup 0.999": schedules.warmup(0.999),
        "power 0.10": schedules.power(sigma_rel=0.10),
    }


def make_rul_model(sensors: int, window: int) -> nn.Module:
    """Two 1-D convolutions over time (32 channels, kernel 5, ReLU), then a dense layer of 64
    and the output: ``(batch, sensors, window) -> (batch,)``. ~70k parameters for 14 sensors
    and 30 cycles, after the shape of Li, Ding & Sun (2018): convolutions along time, flattened,
    one dense layer."""
    return nn.Sequential(
        nn.Conv1d(sensors, 10, 9, padding=4), nn.Tanh(),
        nn.Conv1d(10, 10, 9, padding=4), nn.Tanh(),
        nn.Conv1d(10, 10, 9, padding=4), nn.Tanh(),
        nn.Conv1d(10, 1, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(window, 100), nn.Tanh(),
        nn.Linear(100, 1), nn.Flatten(0),
    )  # fmt: skip


def phm08_score(pred: npt.ArrayLike, true: npt.ArrayLike) -> float:
    """The PHM08 challenge's asymmetric score (lower is better):

        d_i = pred_i - true_i;   s = sum_i (exp(-d_i / 13) - 1 if d_i < 0 else exp(d_i / 10) - 1)

    Late predictions (``d > 0``: the engine fails before predicted) cost more than early ones.
    Saxena, Goebel, Simon & Eklund, "Damage Propagation Modeling for Aircraft Engine
    Run-to-Failure Simulation", PHM 2008 (the scoring function of the challenge).

    Examples:
        >>> round(phm08_score([10.0, 20.0], [23.0, 10.0]), 6)  # early by 13, late by 10
        3.436564
    """
    d = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return float(np.sum(np.where(d < 0, np.expm1(-d / 13.0), np.expm1(d / 10.0))))


def _tensors(x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], cap: int) -> TensorDataset:
    # (windows, cycles, sensors) -> (windows, sensors, cycles) for Conv1d; targets in units of cap
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1))), torch.from_numpy(y / cap)
    )


def train_rul_seed(
    data: RulData, seed: int, *, epochs: int, batch_size: int, lr: float, patience: int
) -> dict[str, Any]:
    """Train one seed (initialisation and batch order; the data split is fixed).

    Returns:
        ``{"seed", "epochs_run", "seconds_per_epoch", "curves": {candidate: {"val_rmse":
        [...], "test_rmse": [...]}}, "chosen": {candidate: {"epoch", "val_rmse", "test_rmse",
        "test_rmse_capped", "score", "predictions"}}}``; RMSEs in cycles, epochs 1-based.
    """
    cap = data.cap
    torch.manual_seed(seed)
    model = make_rul_model(len(data.sensors), data.window)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ema = polyak.EMA(model, average_schedules())
    # tracks each candidate's best validation epoch; the loop stops once every candidate has
    # gone `patience` epochs without beating its own best (a slow average is not cut short by
    # the live weights' early peak, as a stopper over the overall best would do)
    stopper = polyak.EarlyStopping(None, monitor="val_rmse", keep_weights=False)
    train = DataLoader(_tensors(data.x_train, data.y_train, cap), batch_size=batch_size,
                       shuffle=True, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    val = DataLoader(_tensors(data.x_val, data.y_val, cap), batch_size=4096)
    x_test = _tensors(data.x_test, data.y_test, cap).tensors[0]

    def rmse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return _rmse(outputs.double().numpy() * cap, targets.double().numpy() * cap)

    labels = {LIVE: LIVE, **{n: f"ema[{n}]" for n in ema.names}}  # train_with_ema's names
    curves: dict[str, dict[str, list[float]]] = {c: {"val_rmse": [], "test_rmse": []}
                                                 for c in labels}  # fmt: skip
    predictions: dict[str, list[npt.NDArray[np.float64]]] = {c: [] for c in labels}

    @torch.no_grad()
    def predict() -> npt.NDArray[np.float64]:
        model.eval()
        return model(x_test).double().numpy() * cap

    start = time.perf_counter()
    for _ in range(epochs):
        # one epoch per call, so that the test windows can be scored after each epoch; which
        # epoch counts is decided by the stopper, on the validation units only
        history = polyak.train_with_ema(
            model, train, val, optimizer, nn.MSELoss(), 1, ema=ema, metrics={"rmse": rmse},
            early_stopping=stopper, final_weights="live", progress=False,
            nonfinite_loss="continue",  # a diverged run is reported (NaN RMSE), not cut short
        )  # fmt: skip
        for c, label in labels.items():
            key = "val_rmse" if c == LIVE else f"val_rmse_{label}"
            curves[c]["val_rmse"].append(history[key][0])
            if c == LIVE:
                pred = predict()
            else:
                with ema.swapped(model, name=c):
                    pred = predict()
            predictions[c].append(pred)
            curves[c]["test_rmse"].append(_rmse(pred, data.y_test))
        if all(stopper.epoch - b.epoch >= patience for b in stopper.best_by_candidate.values()):
            break
    seconds = time.perf_counter() - start
    best = stopper.best_by_candidate
    chosen = {}
    for c, label in labels.items():
        # a candidate that never scored a finite RMSE (diverged) is reported at its last epoch
        epoch = best[label].epoch if label in best else len(predictions[c])
        pred = predictions[c][epoch - 1]
        chosen[c] = {
            "epoch": epoch,
            "val_rmse": curves[c]["val_rmse"][epoch - 1],
            "test_rmse": _rmse(pred, data.y_test),
            "test_rmse_capped": _rmse(pred, np.minimum(data.y_test, cap)),
            "score": phm08_score(pred, data.y_test),
            "predictions": pred.tolist(),
        }
    epochs_run = len(curves[LIVE]["val_rmse"])
    return {"seed": seed, "epochs_run": epochs_run, "seconds_per_epoch": seconds / epochs_run,
            "curves": curves, "chosen": chosen}  # fmt: skip


def _rmse(pred: npt.NDArray[np.float64], true: npt.NDArray[Any]) -> float:
    """:func:`polyak.metrics.rmse`, NaN for non-finite predictions (a diverged run), which
    :class:`polyak.EarlyStopping` never takes as an improvement."""
    return metrics.rmse(pred, true) if np.isfinite(pred).all() else float("nan")


def _stats(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "values": a.tolist()}


def summarise_rul(runs: list[dict[str, Any]], data: RulData) -> dict[str, Any]:
    """Per candidate, over seeds: test RMSE, capped-target RMSE, PHM08 score and chosen epochs
    (mean, population std and the per-seed values). Per average: the relative RMSE change
    ``rmse_avg / rmse_live - 1`` of each seed, its mean, std and the seeds where it is negative.
    ``chosen_average`` has the lowest mean validation RMSE; ``baseline_rmse`` is the test RMSE of
    predicting the mean training target for every unit."""
    candidates = list(runs[0]["chosen"])
    rows: dict[str, Any] = {}
    for c in candidates:
        got = [r["chosen"][c] for r in runs]
        rows[c] = {k: _stats([g[k] for g in got])
                   for k in ("test_rmse", "test_rmse_capped", "score", "val_rmse")}  # fmt: skip
        rows[c]["epochs"] = [g["epoch"] for g in got]
        if c != LIVE:
            change = [
                g["test_rmse"] / r["chosen"][LIVE]["test_rmse"] - 1 for g, r in zip(got, runs)
            ]
            rows[c]["relative_change"] = _stats(change)
            rows[c]["seeds_lower"] = int(sum(x < 0 for x in change))
    averages = [c for c in candidates if c != LIVE]
    chosen = min(averages, key=lambda c: rows[c]["val_rmse"]["mean"])
    baseline = metrics.rmse(np.full(len(data.y_test), float(data.y_train.mean())), data.y_test)
    return {
        "candidates": rows,
        "chosen_average": chosen,
        "chosen_on": "validation",
        "course_average": COURSE,
        "seeds": len(runs),
        "baseline_rmse": baseline,
        "seconds_per_epoch": _stats([r["seconds_per_epoch"] for r in runs]),
    }
