"""Aggregate the study's runs: mean ± std over seeds, agreement between seeds, and the comparison
of the live weights with the average chosen on the validation split.

The choice never looks at the test set: the "best" average is the one with the highest mean final
validation accuracy (ties: the lower validation NLL), and the best epoch of a run is the epoch of
its highest validation accuracy. The test set only reports what those choices give."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from polyak import metrics
from polyak.cli.study.classify import LIVE

__all__ = ["summarise_noise_level"]

METRICS = ("acc", "nll", "ece", "memorised")


def _stats(values: list[float]) -> dict[str, float]:
    """Mean and (population) std over the values that are not NaN, and their number ``n``."""
    a = np.asarray(values, dtype=float)
    n = int(np.sum(~np.isnan(a)))
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(np.nanmean(a)), "std": float(np.nanstd(a)), "n": n}


def _best_epoch(curves: dict[str, list[float]]) -> tuple[int, float, float]:
    """Epoch (1-based) with the best validation accuracy (first on ties), its validation and its
    test accuracy."""
    i = int(np.argmax(curves["val_acc"]))
    return i + 1, curves["val_acc"][i], curves["test_acc"][i]


def summarise_noise_level(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: final metrics, val-selected best epoch, seed agreement; and the verdict."""
    models = list(runs[0]["final"])
    per_model: dict[str, Any] = {}
    for m in models:
        row: dict[str, Any] = {k: _stats([r["final"][m][k] for r in runs]) for k in METRICS}
        for k in ("val_acc", "val_nll"):
            row[k] = _stats([r["final"][m][k] for r in runs])
        if m in runs[0]["curves"]:
            chosen = [_best_epoch(r["curves"][m]) for r in runs]
            row["best_epoch"] = [b[0] for b in chosen]
            row["best_epoch_val_acc"] = _stats([b[1] for b in chosen])
            row["best_epoch_acc"] = _stats([b[2] for b in chosen])
            row["curve_mean"] = np.mean([r["curves"][m]["test_acc"] for r in runs], 0).tolist()
            row["curve_std"] = np.std([r["curves"][m]["test_acc"] for r in runs], 0).tolist()
        pairs = list(itertools.combinations(range(len(runs)), 2))
        row["agreement"] = _stats(
            [metrics.agreement(runs[i]["predictions"][m], runs[j]["predictions"][m])
             for i, j in pairs]
        )  # fmt: skip
        row["final_acc_per_seed"] = [r["final"][m]["acc"] for r in runs]
        per_model[m] = row
    averages = [m for m in models if m != LIVE]
    best = max(
        averages,
        key=lambda m: (
            round(per_model[m]["val_acc"]["mean"], 12),
            -per_model[m]["val_nll"]["mean"],
        ),
    )
    live, avg = per_model[LIVE], per_model[best]
    seeds_won = sum(a > b for a, b in zip(avg["final_acc_per_seed"], live["final_acc_per_seed"]))
    best_curve = max(
        (m for m in averages if "best_epoch_val_acc" in per_model[m]),
        key=lambda m: per_model[m]["best_epoch_val_acc"]["mean"],
    )
    verdict = {
        "chosen_on": "validation",
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
        "agreement_pairs": avg["agreement"]["n"],
        "best_epoch_live": live["best_epoch"],
        "best_epoch_best_average": per_model[best_curve]["best_epoch"],
    }
    return {"models": per_model, "verdict": verdict}
