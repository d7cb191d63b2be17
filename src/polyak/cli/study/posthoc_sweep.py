"""The study's post-hoc section: choose the averaging horizon after training (EDM2 post-hoc EMA).

Each classification run keeps, beside its three averages, a :class:`polyak.PostHocEMA` with
three power averages (``sigma_rel`` 0.05 and 0.10, EDM2's pair, and 0.20, which the sweep's
wide end needs: with the pair alone the profile of ``sigma_rel`` 0.28 is fitted to 14%, with
0.20 as well to 5%) and a float32 snapshot of them every half epoch. After training,
:func:`polyak.posthoc.reconstruct_many` rebuilds from those snapshots the power average of
every ``sigma_rel`` of a grid from 0.01 to 0.28 (and the run's constant-decay averages), and
each is scored on the validation and test splits. Two checks come with it: the power averages
kept directly must sit on the reconstructed curve (at the last step they are reconstructed
from their own snapshot), and the constant-decay averages kept directly during training
(debiased) must score as their reconstructions do, as far as the snapshots fit their profiles.
The validation split picks ``sigma_rel`` by the study's rule (highest mean validation accuracy
over the seeds, then lower validation NLL); the test split only reports it.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import polyak

__all__ = ["KEPT", "SIGMA_RELS", "Sweep", "equivalent_sigma_rel", "summarise_posthoc"]

KEPT = (0.05, 0.10, 0.20)
"""The ``sigma_rel`` of the power averages kept during training."""
SIGMA_RELS = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.24, 0.28)
"""The ``sigma_rel`` grid reconstructed after training (it holds :data:`KEPT`)."""
METRICS = ("acc", "nll", "val_acc", "val_nll")

Scorer = Callable[[nn.Module], dict[str, float]]


def equivalent_sigma_rel(decay: float, t: int) -> float:
    """EDM2's ``sigma_rel`` of a debiased constant-decay average after ``t`` steps: the standard
    deviation of its weights over the steps (``w_s`` proportional to ``decay**(t - s)``) over
    ``t``, where a power average's profile has its ``sigma_rel``.

    Examples:
        >>> round(equivalent_sigma_rel(0.99, 1000), 2), round(equivalent_sigma_rel(1e-9, 1000), 2)
        (0.1, 0.0)
    """
    s = np.arange(1, t + 1, dtype=np.float64)
    w = decay ** (t - s)
    w /= w.sum()
    mean = w @ s
    return float(np.sqrt(w @ (s - mean) ** 2) / t)


class Sweep:
    """The post-hoc part of one run: the :class:`polyak.PostHocEMA`, updated with the run's
    averages, then the reconstruction and scoring of every ``sigma_rel`` (:meth:`finish`)."""

    def __init__(self, model: nn.Module, directory: Path, steps_per_epoch: int) -> None:
        self.started = time.perf_counter()
        self.ph = polyak.PostHocEMA(
            model,
            directory,
            sigma_rels=KEPT,
            snapshot_every=max(1, steps_per_epoch // 2),
            snapshot_dtype=torch.float32,  # sigma_rel 0.01 magnifies float16 rounding x100
        )
        self.seconds = time.perf_counter() - self.started

    def update(self) -> None:
        """After each optimizer step (timed: the study reports what the section costs)."""
        start = time.perf_counter()
        self.ph.update()
        self.seconds += time.perf_counter() - start

    def finish(
        self, model: nn.Module, score: Scorer, decays: Mapping[str, float], kept: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Reconstruct and score every ``sigma_rel`` and each constant ``decays`` average
        (``{name: decay}``, kept directly with the scores ``kept[name]``).

        ``score(model)`` gives ``acc``, ``nll`` (test) and ``val_acc``, ``val_nll``.
        """
        start = time.perf_counter()
        self.ph.snapshot()  # the last step, if it is not a multiple of snapshot_every
        self.ph.close()
        directory = self.ph.directory
        with warnings.catch_warnings():  # the poor fits at the grid's ends are in the report
            warnings.simplefilter("ignore", UserWarning)
            recs = polyak.posthoc.reconstruct_many(
                directory, SIGMA_RELS, decays=list(decays.values())
            )
        evaluated = copy.deepcopy(model)

        def scored(rec: polyak.posthoc.Reconstruction) -> dict[str, float]:
            evaluated.load_state_dict(rec)
            return {**score(evaluated), "fit": float(rec.fit or 0.0)}

        curve = [scored(recs[rel]) for rel in SIGMA_RELS]
        stored = {}
        for rel, name in self.ph.averages.items():
            rec = recs[rel]
            with self.ph.ema.swapped(model, name):
                scores = score(model)
            average = self.ph.ema.averaged_tensors(name)
            stored[str(rel)] = {
                **scores,
                "weights_rel_diff": max(
                    float((rec[n] - a).abs().max() / a.abs().max().clamp_min(1e-30))
                    for n, a in average.items()
                    if a.is_floating_point()
                ),
            }
        timeline = self.ph.ema.timeline
        t = timeline.last_update_step - timeline.start_step
        constant = {
            name: {
                "decay": d,
                "sigma_rel": equivalent_sigma_rel(d, t),
                "reconstructed": scored(rec),
                "kept": {k: kept[name][k] for k in METRICS},
            }
            for name, d in decays.items()
            for rec in [recs[polyak.posthoc.Target.make(decay=d)]]
        }
        self.seconds += time.perf_counter() - start
        return {
            "curve": curve,
            "kept": stored,
            "decays": constant,
            "snapshots": len(polyak.posthoc.list_snapshots(directory).snapshots),
            "snapshot_every": self.ph.snapshot_every,
            "steps": t,
            "seconds": self.seconds,
        }


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std())}


def summarise_posthoc(runs: list[dict[str, Any]], live: Mapping[str, Any]) -> dict[str, Any]:
    """One noise level: the curve (mean and std over seeds), the ``sigma_rel`` the validation
    split picks, how far the averages kept directly sit from their reconstructions.

    ``live``: the level's summary row of the live weights (for the comparison).
    """
    parts = [r["posthoc"] for r in runs]
    curve = {
        k: _stats_columns([[p["curve"][i][k] for i in range(len(SIGMA_RELS))] for p in parts])
        for k in (*METRICS, "fit")
    }
    pick = max(
        range(len(SIGMA_RELS)),
        key=lambda i: (round(curve["val_acc"]["mean"][i], 12), -curve["val_nll"]["mean"][i]),
    )
    kept = {}
    for rel in map(str, KEPT):
        i = SIGMA_RELS.index(float(rel))
        kept[rel] = {
            **{k: _stats([p["kept"][rel][k] for p in parts]) for k in METRICS},
            "max_acc_diff": max(abs(p["kept"][rel]["acc"] - p["curve"][i]["acc"]) for p in parts),
            "max_nll_diff": max(abs(p["kept"][rel]["nll"] - p["curve"][i]["nll"]) for p in parts),
            "max_weights_rel_diff": max(p["kept"][rel]["weights_rel_diff"] for p in parts),
        }
    decays = {}
    for name, first in parts[0]["decays"].items():
        rows = [p["decays"][name] for p in parts]
        decays[name] = {
            "decay": first["decay"],
            "sigma_rel": first["sigma_rel"],
            "fit": _stats([r["reconstructed"]["fit"] for r in rows]),
            "kept": {k: _stats([r["kept"][k] for r in rows]) for k in METRICS},
            "reconstructed": {k: _stats([r["reconstructed"][k] for r in rows]) for k in METRICS},
            "max_acc_diff": max(abs(r["kept"]["acc"] - r["reconstructed"]["acc"]) for r in rows),
            "max_nll_diff": max(abs(r["kept"]["nll"] - r["reconstructed"]["nll"]) for r in rows),
        }
    return {
        "sigma_rels": list(SIGMA_RELS),
        "curve": curve,
        "chosen": {
            "sigma_rel": SIGMA_RELS[pick],
            "val_acc": curve["val_acc"]["mean"][pick],
            "acc": {"mean": curve["acc"]["mean"][pick], "std": curve["acc"]["std"][pick]},
            "nll": {"mean": curve["nll"]["mean"][pick], "std": curve["nll"]["std"][pick]},
            "live_acc": live["acc"]["mean"],
        },
        "kept": kept,
        "decays": decays,
        "snapshots": parts[0]["snapshots"],
        "snapshot_every": parts[0]["snapshot_every"],
        "seconds": _stats([p["seconds"] for p in parts]),
    }


def _stats_columns(rows: list[list[float]]) -> dict[str, list[float]]:
    a = np.asarray(rows, dtype=float)
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist()}
