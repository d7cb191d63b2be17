"""``polyak.EarlyStopping``: the best epoch over the live weights and every average."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from polyak._torch.naming import check_tensors
from polyak.workflows._common import (
    check_count,
    check_module,
    named_tensors,
)

__all__ = ["Best", "EarlyStopping"]

_MODES = ("min", "max")


def _nonnegative(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not 0.0 <= float(value) < math.inf:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Best:
    """The best score seen: at which epoch (1-based), by which weights, and its value."""

    epoch: int
    which: str
    value: float


class EarlyStopping:
    """Watch a score for several sets of weights; keep the best; stop when it stops improving.

    Each epoch, report the monitored score of every candidate (``"live"`` and each average) with
    :meth:`update` (or :meth:`observe` per candidate, then :meth:`end_epoch`). A score improves
    on the best so far when

        mode="min":  value < best - min_delta          mode="max":  value > best + min_delta

    (NaN never improves). The weights of the best candidate are copied (parameters and buffers,
    one model's worth of memory, reused) so that :meth:`restore` can put them into a model.
    Training should stop once ``patience`` epochs in a row brought no improvement by any
    candidate: :meth:`update` then returns ``True``. The best epoch of each candidate is kept
    too (:attr:`best_by_candidate`): averaged weights usually peak well before the end of
    training (Morales-Brotons et al. stop their EMA at ~3/4 of the budget or earlier).

    Args:
        patience: epochs without improvement before stopping; ``None`` never stops (track only).
        mode: ``"min"`` (losses) or ``"max"`` (accuracies).
        min_delta: how much a score must beat the best by to count as an improvement (>= 0).
        monitor: the history key :func:`polyak.train_with_ema` feeds (``"val_loss"`` or
            ``"val_<metric>"``); not used otherwise.
        keep_weights: copy the best weights (default); ``False`` keeps only epochs and scores.

    Examples:
        >>> import torch, polyak
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = polyak.EMA(model, decay=0.9)
        >>> stopper = polyak.EarlyStopping(patience=2)
        >>> val_losses = [(0.9, 0.8), (0.7, 0.6), (0.8, 0.65), (0.9, 0.7), (0.5, 0.5)]
        >>> models = {"live": model, "ema": ema.get_module()}
        >>> for live, averaged in val_losses:  # each epoch: train, ema.update(), evaluate
        ...     if stopper.update({"live": live, "ema": averaged}, models):
        ...         break
        >>> stopper.best  # two epochs without improvement after epoch 2: stopped at epoch 4
        Best(epoch=2, which='ema', value=0.6)
        >>> _ = stopper.restore(model)  # the model now holds the best weights

    References:
        Morales-Brotons, Vogels & Hendrikx, TMLR 2024, Sec. 3 and Table 6 (early-stopped EMA).
    """

    def __init__(
        self,
        patience: int | None,
        mode: Literal["min", "max"] = "min",
        *,
        min_delta: float = 0.0,
        monitor: str = "val_loss",
        keep_weights: bool = True,
    ) -> None:
        if patience is not None:
            patience = check_count(patience, "patience (or None)")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        min_delta = _nonnegative(min_delta, "min_delta")
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be a non-empty string, got {monitor!r}")
        self.patience = None if patience is None else int(patience)
        self.mode = mode
        self.min_delta = float(min_delta)
        self.monitor = monitor
        self.keep_weights = bool(keep_weights)
        self.epoch = 0
        """Epochs ended so far; observations belong to epoch ``self.epoch + 1``."""
        self.epochs_without_improvement = 0
        self.stopped_epoch: int | None = None
        """The first epoch at which :attr:`should_stop` became true (``None`` before)."""
        self.history: dict[str, list[float]] = {}
        """Scores per candidate, one per epoch (NaN where a candidate was not reported)."""
        self._best: Best | None = None
        self._by_candidate: dict[str, Best] = {}
        self._round: dict[str, float] = {}
        self._improved = False
        self._state: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------- reporting
    def _better(self, value: float, ref: Best | None) -> bool:
        if math.isnan(value):
            return False
        if ref is None:
            return True
        if self.mode == "min":
            return value < ref.value - self.min_delta
        return value > ref.value + self.min_delta

    def observe(self, which: str, value: float, model: nn.Module | None = None) -> bool:
        """Report candidate ``which``'s score for the current epoch.

        Pass ``model`` (holding that candidate's weights now: ``ema.get_module()``, or the model
        inside ``ema.swapped(...)``) to have its weights copied if it is the new best.

        Returns:
            Whether this score is the new overall best.
        """
        if not isinstance(which, str) or not which:
            raise TypeError(f"the candidate's name must be a non-empty string, got {which!r}")
        if which in self._round:
            raise ValueError(f"{which!r} was already reported for epoch {self.epoch + 1}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"the score of {which!r} must be a number, got {value!r}") from None
        if model is not None:
            check_module(model, f"the model of {which!r}")
        self._round[which] = value
        here = Best(self.epoch + 1, which, value)
        if self._better(value, self._by_candidate.get(which)):
            self._by_candidate[which] = here
        if not self._better(value, self._best):
            return False
        if self.keep_weights and model is not None:
            self._snapshot(model)
        elif self.keep_weights:
            self._state = None  # the best weights were not given: restore() must refuse
        self._best = here
        self._improved = True
        return True

    def end_epoch(self) -> bool:
        """Close the epoch's reports; returns :attr:`should_stop`."""
        if not self._round:
            raise ValueError("end_epoch() without any score reported for this epoch")
        self.epoch += 1
        for name in self._round.keys() - self.history.keys():
            self.history[name] = [math.nan] * (self.epoch - 1)
        for name, values in self.history.items():
            values.append(self._round.get(name, math.nan))
        self.epochs_without_improvement = (
            0 if self._improved else self.epochs_without_improvement + 1
        )
        self._round, self._improved = {}, False
        if self.should_stop and self.stopped_epoch is None:
            self.stopped_epoch = self.epoch
        return self.should_stop

    def update(
        self, scores: Mapping[str, float], models: Mapping[str, nn.Module] | None = None
    ) -> bool:
        """Report one epoch: ``scores`` and (optionally) ``models`` by candidate name.

        Returns:
            :attr:`should_stop`.
        """
        if not isinstance(scores, Mapping) or not scores:
            raise TypeError(f"scores must be a non-empty dict {{name: score}}, got {scores!r}")
        models = {} if models is None else models
        unknown = [n for n in models if n not in scores]
        if unknown:
            raise ValueError(f"models given for {unknown} but no score; scores: {list(scores)}")
        for name, value in scores.items():
            self.observe(name, value, models.get(name))
        return self.end_epoch()

    # ----------------------------------------------------------------- reading out
    @property
    def should_stop(self) -> bool:
        """``patience`` epochs in a row without improvement."""
        return self.patience is not None and self.epochs_without_improvement >= self.patience

    @property
    def best(self) -> Best | None:
        """The best (epoch, candidate, value) so far, ``None`` before any finite score."""
        return self._best

    @property
    def best_epoch(self) -> int | None:
        return None if self._best is None else self._best.epoch

    @property
    def best_which(self) -> str | None:
        return None if self._best is None else self._best.which

    @property
    def best_value(self) -> float | None:
        return None if self._best is None else self._best.value

    @property
    def best_by_candidate(self) -> dict[str, Best]:
        """Each candidate's own best (epoch, value); no weights are kept for these."""
        return dict(self._by_candidate)

    @property
    def best_state(self) -> dict[str, torch.Tensor] | None:
        """The best weights (``{canonical name: tensor}``), or ``None`` if none were kept."""
        return self._state

    # ----------------------------------------------------------------- weights
    @torch.no_grad()
    def _snapshot(self, model: nn.Module) -> None:
        tensors = named_tensors(model)
        state = self._state
        reusable = (
            state is not None
            and state.keys() == tensors.keys()
            and all(
                state[n].shape == t.shape
                and state[n].dtype == t.dtype
                and state[n].device == t.device
                for n, t in tensors.items()
            )
        )
        if state is not None and reusable:
            for n, t in tensors.items():
                state[n].copy_(t)
        else:
            self._state = {n: t.detach().clone() for n, t in tensors.items()}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> Best:
        """Copy the best weights into ``model`` (matched by canonical name; shapes checked first).

        Returns:
            The :class:`Best` record of the restored weights.

        Raises:
            RuntimeError: no best weights were kept (no model was reported with the best score,
                or ``keep_weights=False``).
            ValueError: the model's tensors differ in names or shapes from the kept ones.
        """
        check_module(model)
        if self._best is None or self._state is None:
            raise RuntimeError(
                "no best weights to restore: report models with their scores "
                "(update(scores, models) or observe(name, score, model)) and keep_weights=True"
            )
        targets = named_tensors(model)
        check_tensors(targets, self._state, f"the best weights ({type(model).__name__})")
        for n, t in targets.items():
            t.copy_(self._state[n])
        return self._best

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(patience={self.patience}, mode={self.mode!r}, epoch={self.epoch}, "
            f"best={self._best}, without_improvement={self.epochs_without_improvement})"
        )
