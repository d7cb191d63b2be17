"""Precision of post-hoc reconstruction: error vs snapshots, and float16/bfloat16 snapshots.

1. Synthetic stream (2000 steps, a drifting random walk of 4000 weights of size ~1): the
   ``sigma_rel`` 0.08 average reconstructed from snapshots of 0.05 and 0.10 taken every 400,
   200, 100 or 50 steps, against a power(0.08) average kept directly in float64. Error:
   ``max |reconstruction - direct|``, divided by the largest movement of a weight over the run.
2. Real training (the digits MLP of ``examples/posthoc_ema.py``, 20% label noise, 40 epochs):
   the same run stores float32, float16 and bfloat16 snapshots; for a sweep of sigma_rel the
   float16/bfloat16 reconstructions are compared with the float32 one: weights (relative to the
   largest weight), validation NLL, and the share of validation predictions that change.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import polyak

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synthetic(steps: int = 2000, size: int = 4000) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(size, generator=gen))
    model = nn.ParameterList([w])
    drift = torch.randn(size, generator=gen)
    direct = polyak.EMA(model, polyak.schedules.power(sigma_rel=0.08), dtype=torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        stores = {
            (every, name): polyak.PostHocEMA(
                model, Path(tmp) / f"{every}-{name}", snapshot_every=every, snapshot_dtype=dt
            )
            for every in (400, 200, 100, 50)
            for name, dt in DTYPES.items()
        }
        lo, hi = w.detach().clone(), w.detach().clone()
        for _ in range(steps):
            with torch.no_grad():
                w.add_(1e-3 * (drift + torch.randn(size, generator=gen)))
            lo, hi = torch.minimum(lo, w), torch.maximum(hi, w)
            direct.update()
            for ph in stores.values():
                ph.update()
        movement = (hi - lo).max().item()
        ref = direct.averaged_tensors()["0"]
        rows = []
        for (every, name), ph in stores.items():
            ph.close()
            rec = polyak.posthoc.reconstruct(ph.directory, sigma_rel=0.08)
            err = (rec["0"].double() - ref).abs().max().item()
            rows.append(
                {
                    "snapshots": steps // every,
                    "dtype": name,
                    "error": err / movement,
                    "fit": rec.fit,
                    "max_abs_weight": ref.abs().max().item(),
                    "movement": movement,
                }
            )
    return rows


def _digits(seed: int = 0, noise: float = 0.2):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train, val = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed, stratify=y)
    y_train = y[train].clone()
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(train), generator=gen) < noise
    y_train[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
    return (x[train], y_train), (x[val], y[val])


def training(epochs: int = 40) -> list[dict]:
    torch.manual_seed(0)
    (x, y), (xv, yv) = _digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    sigmas = [0.01, 0.02, 0.05, 0.1, 0.2]
    with tempfile.TemporaryDirectory() as tmp:
        stores = {
            name: polyak.PostHocEMA(model, Path(tmp) / name, snapshot_every=17, snapshot_dtype=dt)
            for name, dt in DTYPES.items()
        }
        gen = torch.Generator().manual_seed(1)
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=gen).split(32):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                for ph in stores.values():
                    ph.update()
        recs = {}
        for name, ph in stores.items():
            ph.close()
            recs[name] = list(polyak.posthoc.reconstruct_many(ph.directory, sigmas).values())
    rows = []
    with torch.no_grad():
        for i, s in enumerate(sigmas):
            base = recs["float32"][i]
            model.load_state_dict(base)
            logits = model(xv)
            nll = nn.functional.cross_entropy(logits, yv).item()
            size = max(t.abs().max().item() for t in base.values())
            for name in ("float16", "bfloat16"):
                rec = recs[name][i]
                model.load_state_dict(rec)
                other = model(xv)
                rows.append(
                    {
                        "sigma_rel": s,
                        "dtype": name,
                        "weight_error": max((rec[k] - base[k]).abs().max().item() for k in base)
                        / size,
                        "nll_float32": nll,
                        "nll_change": nn.functional.cross_entropy(other, yv).item() - nll,
                        "predictions_changed": (other.argmax(1) != logits.argmax(1))
                        .float()
                        .mean()
                        .item(),
                        "accuracy_change": (
                            (other.argmax(1) == yv).float().mean()
                            - (logits.argmax(1) == yv).float().mean()
                        ).item(),
                    }
                )
    return rows


def run(quick: bool = False) -> dict:
    print("precision: synthetic stream ...", flush=True)
    out = {"synthetic": synthetic()}
    print("precision: digits training ...", flush=True)
    out["epochs"] = 8 if quick else 40
    out["training"] = training(epochs=out["epochs"])
    return out
