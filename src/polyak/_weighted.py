"""Weighted averages as decay schedules: ``avg_t = sum_{s<=t} w_s theta_s / sum_{s<=t} w_s``.

An average that gives the value of optimizer step ``s`` the weight ``w_s`` is an EMA whose
per-step decay is ``decay_s = W_{s-1} / W_s`` with ``W_t = sum_{s<=t} w_s``; over a gap of ``dt``
steps the product of those decays telescopes to ``W_{t-dt} / W_t``, so an update every ``k``
steps is exact for a value held over the gap (the design's rule 2). Step 1 has ``W_0 = 0``: the
first update copies, and the initial weights keep no weight (as in :func:`polyak.schedules.uniform`,
which is ``weighted(lambda t: 1.0)``). Pure Python (``math`` only).

``W_t`` is a running float64 sum kept by the schedule (one call of the weight function per new
step; a call for an earlier step sums again from the start), so a weight function must be a pure
function of the step: that is what makes resuming and ``update_every`` exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from polyak._horizon import integer, real
from polyak.schedules import Schedule

__all__ = ["lr_weighted", "polynomial", "weighted"]


class _Weighted(Schedule):
    kind = "weighted"

    def __init__(self, weight: Callable[[int], float], total_steps: int | None = None) -> None:
        if not callable(weight):
            raise TypeError(f"weight must be a callable step -> weight, got {weight!r}")
        self.weight = weight
        self.total_steps = None if total_steps is None else integer("total_steps", total_steps, 1)
        self._sum = (0, 0.0)  # (t, W_t): the running sum, extended as steps come

    def _w(self, s: int) -> float:
        value = self.weight(s)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # NumPy scalars, 0-d arrays
            except (TypeError, ValueError):
                raise TypeError(
                    f"{self.name}: the weight of step {s} is {value!r}, not a number"
                ) from None
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(
                f"{self.name}: the weight of step {s} is {value!r}; weights must be finite and >= 0"
            )
        return float(value)

    def total(self, t: int) -> float:
        """``W_t = sum_{s=1..t} w_s`` in float64 (``W_0 = 0``)."""
        start, acc = self._sum
        if t < start:
            start, acc = 0, 0.0
        for s in range(start + 1, t + 1):
            acc += self._w(s)
        self._sum = (t, acc)
        return acc

    def _gap(self, t: int, dt: int) -> float:
        before = self.total(t - dt)
        now = self.total(t)
        return before / now if now > 0.0 else 0.0  # no weight yet: the average is the latest

    def _step(self, t: int) -> float:
        return self._gap(t, 1)

    def _params(self) -> dict[str, Any]:
        return {"weight": self._label(), "total_steps": self.total_steps}

    def _label(self) -> str:
        return str(getattr(self.weight, "__name__", type(self.weight).__name__))

    @property
    def name(self) -> str:
        return f"weighted({self._label()})"


def weighted(weight: Callable[[int], float], *, total_steps: int | None = None) -> Schedule:
    """The average that weighs the value of optimizer step ``t`` by ``weight(t)``.

        avg_t = sum_{s<=t} w_s theta_s / W_t,   W_t = sum_{s<=t} w_s,
        decay_t = 1 - w_t / W_t = W_{t-1} / W_t,   over a gap of dt steps W_{t-dt} / W_t.

    Args:
        weight: ``weight(t) -> float >= 0`` for the 1-based optimizer step ``t``; a pure
            function of ``t`` (called once per step, in order).
        total_steps: only for :mod:`polyak.jax`, whose traced twin looks ``w_t`` and ``W_t`` up
            in a table of this many steps built once on the host (steps beyond it give NaN).

    Examples:
        >>> s = weighted(lambda t: 1.0)             # the running mean, like uniform()
        >>> s(1), s(2), s(4, dt=2)
        (0.0, 0.5, 0.5)
        >>> round(weighted(lambda t: t)(3), 12)     # weights 1, 2, 3: decay 3/6
        0.5
    """
    return _Weighted(weight, total_steps)


class _Polynomial(_Weighted):
    kind = "polynomial"

    def __init__(self, r: float) -> None:
        self.r = real("r", r)
        if self.r < 0.0:
            raise ValueError(f"r must be >= 0 (later steps weigh at least as much), got {r!r}")
        exponent = self.r
        super().__init__(lambda t: float(t) ** exponent)

    def _params(self) -> dict[str, Any]:
        return {"r": self.r}

    @property
    def name(self) -> str:
        return f"polynomial({self.r:g})"


def polynomial(r: float) -> Schedule:
    """Polynomially weighted average: step ``t`` weighs ``t ** r``.

    ``r = 0`` is the running mean (:func:`polyak.schedules.uniform`); larger ``r`` leans on
    later steps, as Schedule-Free's ``r`` (Defazio et al. 2024) and Shamir & Zhang's
    polynomial-decay averaging (ICML 2013) do. It is the discrete counterpart of EDM2's power
    average (:func:`polyak.schedules.power`, which weighs ``tau ** gamma`` on a continuum and
    decays by ``(1 - dt/t) ** (gamma + 1)``): the two differ by ``O(1/t)``.

    Args:
        r: the exponent, ``>= 0``.

    Examples:
        >>> round(polynomial(1.0)(3), 12), polynomial(0.0)(4)
        (0.5, 0.75)
    """
    return _Polynomial(r)


class _LRWeighted(_Weighted):
    kind = "lr_weighted"

    def __init__(
        self,
        lr: Callable[[int], float],
        power: float,
        r: float,
        running_max: bool,
        total_steps: int | None,
    ) -> None:
        if not callable(lr):
            raise TypeError(f"lr must be a callable step -> learning rate, got {lr!r}")
        self.lr = lr
        self.power = real("power", power)
        self.r = real("r", r)
        if self.power < 0.0 or self.r < 0.0:
            raise ValueError(f"power and r must be >= 0, got power={power!r}, r={r!r}")
        if not isinstance(running_max, bool):
            raise TypeError(f"running_max must be True or False, got {running_max!r}")
        self.running_max = running_max
        self._peak = (0, 0.0)  # (t, max lr over steps <= t)
        super().__init__(self._lr_weight, total_steps)

    def _rate(self, t: int) -> float:
        value = float(self.lr(t))
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"{self.name}: lr({t}) is {value!r}; a learning rate is >= 0")
        if not self.running_max:
            return value
        start, peak = self._peak
        if t < start:
            start, peak = 0, 0.0
        for s in range(start + 1, t):
            peak = max(peak, float(self.lr(s)))
        peak = max(peak, value)
        self._peak = (t, peak)
        return peak

    def _lr_weight(self, t: int) -> float:
        return float(t) ** self.r * self._rate(t) ** self.power

    def _params(self) -> dict[str, Any]:
        return {
            "lr": str(getattr(self.lr, "__name__", type(self.lr).__name__)),
            "power": self.power,
            "r": self.r,
            "running_max": self.running_max,
            "total_steps": self.total_steps,
        }

    @property
    def name(self) -> str:
        return f"lr_weighted(power={self.power:g}" + (f", r={self.r:g})" if self.r else ")")


def lr_weighted(
    lr: Callable[[int], float],
    *,
    power: float = 2.0,
    r: float = 0.0,
    running_max: bool = True,
    total_steps: int | None = None,
) -> Schedule:
    """Learning-rate-weighted average, Schedule-Free's: step ``t`` weighs
    ``t ** r * lr_t ** power``.

        c_t = w_t / sum_{s<=t} w_s,   avg_t = (1 - c_t) avg_{t-1} + c_t theta_t

    Defazio et al., "The Road Less Scheduled" (NeurIPS 2024), weigh the average by ``lr_t ** 2``
    so that the steps of a learning-rate warm-up count less. Their reference optimizer
    (``schedulefree/sgd_schedulefree_reference.py``, ``weight_lr_power=2``, ``r=0``) uses the
    running maximum of the scheduled rate, ``lr_max``: so does ``running_max=True`` (the default);
    ``running_max=False`` weighs by the rate of the step itself, which also lets a decaying
    rate's last steps count less.

    Args:
        lr: ``lr(t)``: the learning rate of optimizer step ``t`` (1-based), a pure function of
            ``t`` (e.g. the formula of your warm-up and decay).
        power: exponent of the rate (``weight_lr_power``), ``>= 0``.
        r: exponent of the step, ``>= 0`` (Schedule-Free's polynomial weighting ``r``).
        running_max: weigh by ``max_{s<=t} lr_s`` (Schedule-Free) instead of ``lr_t``.
        total_steps: only for :mod:`polyak.jax` (see :func:`weighted`).

    Examples:
        >>> warm = lr_weighted(lambda t: min(1.0, t / 2))   # lr 0.5, 1, 1, ...: weights 1/4, 1, 1
        >>> round(warm(2), 12), round(warm(3), 12)
        (0.2, 0.555555555556)
    """
    return _LRWeighted(lr, power, r, running_max, total_steps)
