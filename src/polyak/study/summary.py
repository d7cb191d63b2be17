"""Aggregate the study's runs: mean ± std over seeds, agreement between seeds, the comparison
of the best average with the live weights."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from polyak import metrics
from polyak.study.classify import LIVE

__all__ = ["summarise_noise_level"]

METRICS = ("acc", "nll", "ece", "memorised")


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    if np.all(np.isnan(a)):
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(np.nanmean(a)), "std": float(np.nanstd(a))}


def _best_epoch(curves: dict[str, list[float]]) -> tuple[int, float]:
    """Epoch (1-based) with the best validation accuracy (first on ties), and its test accuracy."""
    i = int(np.argmax(curves["val_acc"]))
    return i + 1, curves["test_acc"][i]


def summarise_noise_level(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: final metrics, val-selected best epoch, seed agreement; and the verdict."""
    models = list(runs[0]["final"])
    per_model: dict[str, Any] = {}
    for m in models:
        row: dict[str, Any] = {k: _stats([r["final"][m][k] for r in runs]) for k in METRICS}
        if m in runs[0]["curves"]:
            chosen = [_best_epoch(r["curves"][m]) for r in runs]
            row["best_epoch"] = [b[0] for b in chosen]
            row["best_epoch_acc"] = _stats([b[1] for b in chosen])
            row["curve_mean"] = np.mean([r["curves"][m]["test_acc"] for r in runs], 0).tolist()
            row["curve_std"] = np.std([r["curves"][m]["test_acc"] for r in runs], 0).tolist()
        pairs = list(itertools.combinations(range(len(runs)), 2))
        row["agreement"] = _stats(
            [metrics.agreement(runs[i]["predictions"][m], runs[j]["predictions"][m])
             for i, j in pairs]
        ) if pairs else _stats([float("nan")])  # fmt: skip
        row["final_acc_per_seed"] = [r["final"][m]["acc"] for r in runs]
        per_model[m] = row
    averages = [m for m in models if m != LIVE]
    best = max(averages, key=lambda m: per_model[m]["acc"]["mean"])
    live, avg = per_model[LIVE], per_model[best]
    seeds_won = sum(a > b for a, b in zip(avg["final_acc_per_seed"], live["final_acc_per_seed"]))
    best_curve = max(
        (m for m in averages if "best_epoch_acc" in per_model[m]),
        key=lambda m: per_model[m]["best_epoch_acc"]["mean"],
    )
    verdict = {
        "best_average": best,
        "final_acc_gain": avg["acc"]["mean"] - live["acc"]["mean"],
        "seeds_won": int(seeds_won),
        "seeds": len(runs),
        "best_epoch_average": best_curve,
        "best_epoch_acc_gain": per_model[best_curve]["best_epoch_acc"]["mean"]
        - live["best_epoch_acc"]["mean"],
        "ece_ratio": avg["ece"]["mean"] / live["ece"]["mean"],
        "nll_change": avg["nll"]["mean"] - live["nll"]["mean"],
        "agreement_gain": avg["agreement"]["mean"] - live["agreement"]["mean"],
        "best_epoch_live": live["best_epoch"],
        "best_epoch_best_average": per_model[best_curve]["best_epoch"],
    }
    return {"models": per_model, "verdict": verdict}
