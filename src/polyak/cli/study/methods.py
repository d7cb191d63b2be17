"""The study's methods section: BEMA, SWAG and write-back beside the plain EMA.

In each classification run (``--methods``, the default) a second :class:`polyak.EMA` keeps two
BEMA averages (TRL's defaults, and a slower EMA part) and a :class:`polyak.SWAG` (K = 10) collects
the weights four times per epoch over the second half of training. After training each is
scored as the study scores its averages, BatchNorm statistics recomputed on the training inputs
(for SWAG: for each of ``SAMPLES`` draws, whose predictions are averaged). Write-back changes
the trajectory, so it gets runs of its own (:func:`train_write_back`): the same model, seed and
batches, with a per-epoch Switch EMA or a PMA-style restarting uniform average written into the
live weights. Every choice between variants is made on the validation split
(:mod:`polyak.cli.study.methods_report`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import polyak
from polyak import schedules
from polyak.averages import bema
from polyak.cli.study.models import cosine_lr, seeded_sgd
from polyak.workflows import WriteBack, recompute_bn

__all__ = ["BEMAS", "SAMPLES", "SCALES", "WRITE_BACKS", "Methods", "train_write_back"]

BEMAS = {"bema": bema(), "bema k=0.8": bema(0.8, 0.2)}
"""TRL's defaults (kappa 0.5, eta 0.2, rho 10), and a longer EMA part (kappa 0.8)."""
RANK = 10
SAMPLES = 8
SCALES = (0.25, 0.5)
WRITE_BACKS = ("switch ema 0.99", "pma uniform/3 epochs")
"""Switch EMA: a debiased 0.99 EMA written into the live weights at each epoch end; PMA-style:
a uniform average written back and restarted every third epoch."""

Predict = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Score = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over the floating tensors both hold."""
    keys = [k for k in b if k in a and b[k].is_floating_point() and "running" not in k]
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys)
    den = sum(float(b[k].double().square().sum()) for k in keys)
    return math.sqrt(num / den)


class Methods:
    """BEMA averages and a SWAG kept in one classification run of the study."""

    def __init__(self, model: nn.Module, steps_per_epoch: int, total: int) -> None:
        self.ema = polyak.EMA(model, dict(BEMAS))
        self.swag = polyak.SWAG(
            model, rank=RANK, start_step=total // 2, update_every=max(1, steps_per_epoch // 4)
        )
        self.distance: dict[str, list[float]] = {}

    def update(self) -> None:
        self.ema.update()
        self.swag.update()

    def epoch_end(self, model: nn.Module, study: polyak.EMA) -> None:
        """How far each average is from the live weights (BEMA: its corrected weights)."""
        live = {k: v.detach() for k, v in model.state_dict().items()}
        rows = {n: self.ema.averaged_state_dict(n) for n in BEMAS}
        rows |= {n: study.averaged_state_dict(n) for n in study.names}
        for name, avg in rows.items():
            self.distance.setdefault(name, []).append(_distance(avg, live))

    def finish(
        self,
        model: nn.Module,
        split: Any,
        batches: list[torch.Tensor],
        predict: Predict,
        score: Score,
    ) -> dict[str, Any]:
        """Scores (test, and validation as ``val_*``) of each BEMA average, the SWA mean and
        SWAG at each scale, BatchNorm recomputed on ``batches`` for every one."""

        def scores(val: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
            out = score(test, split.y_test)
            out.update({f"val_{k}": v for k, v in score(val, split.y_val).items()})
            return out

        def evaluate(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            recompute_bn(m, batches)
            return predict(m, split.x_val), predict(m, split.x_test)

        out: dict[str, Any] = {}
        for name in BEMAS:
            with self.ema.swapped(model, name):  # the corrected weights
                out[name] = scores(*evaluate(model))
        draw = _copy(model)
        self.swag.sample(draw, scale=0.0)
        out["swa mean"] = scores(*evaluate(draw))
        for scale in SCALES:
            gen = torch.Generator().manual_seed(0)
            val_sum: torch.Tensor | None = None
            test_sum: torch.Tensor | None = None
            for _ in range(SAMPLES):
                self.swag.sample(draw, scale=scale, generator=gen)
                v, t = evaluate(draw)
                val_sum = v.double() if val_sum is None else val_sum + v.double()
                test_sum = t.double() if test_sum is None else test_sum + t.double()
            assert val_sum is not None and test_sum is not None
            out[f"swag {scale:g}"] = scores(
                (val_sum / SAMPLES).float(), (test_sum / SAMPLES).float()
            )
        out["collected"] = self.swag.collected
        out["distance"] = self.distance
        return out


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def train_write_back(cfg: Any, split: Any, seed: int, variant: str) -> dict[str, Any]:
    """One run of the study's training (same model, seed and batches as its classification
    run) with ``variant`` of write-back; the final live weights scored (test and ``val_*``)."""
    from polyak.cli.study.classify import _predict, _scores  # classify imports this module

    def predict(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _predict(m, x)

    def score(p: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return _scores(p, y, cfg.ece_bins)

    model, opt, _, total = seeded_sgd(cfg, split, seed)
    lr_at = cosine_lr(opt, total)
    if variant == "switch ema 0.99":
        ema = polyak.EMA(model, schedules.debiased(0.99))
        wb = WriteBack(every=1, unit="epochs")
    elif variant == "pma uniform/3 epochs":
        ema = polyak.EMA(model, schedules.uniform())
        wb = WriteBack(every=3, unit="epochs", restart=True)
    else:
        raise ValueError(f"unknown write-back variant {variant!r}; one of {WRITE_BACKS}")
    gen = torch.Generator().manual_seed(10_000 + seed)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for idx in torch.randperm(len(split.x_train), generator=gen).split(cfg.batch_size):
            loss = nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            if not math.isfinite(loss.item()):
                from polyak.cli.study.config import TrainingDiverged

                raise TrainingDiverged.at(loss.item(), epoch, seed, cfg.lr, f"{variant} run")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_at.step()
            ema.update()
        wb.apply(ema, model, epoch, "epochs")  # the last one too: the method's final model
    out = score(predict(model, split.x_test), split.y_test)
    out.update({f"val_{k}": v for k, v in score(predict(model, split.x_val), split.y_val).items()})
    return {"seed": seed, "variant": variant, "final": out}
