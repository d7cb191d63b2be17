"""Traced twins of the weighted schedules (:mod:`polyak._weighted`) and of BEMA
(:mod:`polyak.averages`), in the form of :mod:`polyak.jax._decays`: ``(t, dt) -> (decay,
1 - decay)`` on traced integer steps, the update weight computed directly where the decay is
near 1.

A weighted average decays by ``W_{t-dt} / W_t`` over a gap; its weight ``1 - decay`` is
``G / W_t`` with ``G`` the weights of the gap, summed in a traced loop over its ``dt`` steps, so
no difference of two large sums is ever taken in float32. ``W_t`` has a closed form for the
polynomial weights ``t ** r`` (the exact sum up to step 64, Euler-Maclaurin beyond, whose next
term is ``~t^-6`` relative); for any other weight function it is looked up in a table of
``total_steps`` steps built once on the host in float64 (steps beyond it give NaN).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polyak import _weighted, averages
from polyak.jax._decays import Pair, Twin, _f, _from_log, _loop_sum
from polyak.schedules import Schedule

__all__ = ["BemaTwin", "more_twin"]

_EXACT_UP_TO = 64
_tokens = itertools.count()


@dataclass(frozen=True)
class BemaTwin(Twin):
    """BEMA's EMA part: step ``j`` decays by ``1 - clamp((lag + multiplier j)^-ema_power)``,
    0 for steps up to ``anchor_step``; ``per_update``: one factor per update."""

    ema_power: float
    bias_power: float
    lag: float
    multiplier: float
    min_beta: float
    anchor_step: int
    per_update: bool

    def _log_step(self, j: jax.Array) -> jax.Array:
        beta = jnp.exp(-self.ema_power * jnp.log(self.lag + self.multiplier * _f(j)))
        return jnp.log1p(-jnp.clip(beta, self.min_beta, 1.0))

    def anchor_due(self, t: jax.Array, dt: jax.Array) -> jax.Array:
        return t - dt < self.anchor_step

    def alpha(self, t: jax.Array) -> jax.Array:
        return jnp.exp(-self.bias_power * jnp.log(self.lag + self.multiplier * _f(t)))

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        per_update = self.per_update  # one factor per update, TRL's; else one per step
        log = self._log_step(t) if per_update else _loop_sum(self._log_step, t - dt + 1, dt)
        decay, weight = _from_log(log)
        due = self.anchor_due(t, dt)
        return jnp.where(due, 0.0, decay), jnp.where(due, 1.0, weight)


@dataclass(frozen=True)
class _PolynomialSum(Twin):
    """``polynomial(r)``: weight ``G / W_t``, ``W_t = sum_{s<=t} s^r``."""

    r: float
    offset: float  # W_N - EM(N) at N = 64, in float64: the constant of the expansion

    def _em(self, t: jax.Array) -> jax.Array:
        r, x = self.r, _f(t)
        out = x ** (r + 1.0) / (r + 1.0) + 0.5 * x**r + r / 12.0 * x ** (r - 1.0)
        return out - r * (r - 1.0) * (r - 2.0) / 720.0 * x ** (r - 3.0) + self.offset

    def _total(self, t: jax.Array) -> jax.Array:
        exact = _loop_sum(lambda j: _f(j) ** self.r, jnp.ones_like(t), jnp.minimum(t, _EXACT_UP_TO))
        return jnp.where(t <= _EXACT_UP_TO, exact, self._em(jnp.maximum(t, _EXACT_UP_TO)))

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        gap = _loop_sum(lambda j: _f(j) ** self.r, t - dt + 1, dt)
        weight = gap / self._total(t)
        return 1.0 - weight, weight


def _em64(r: float, x: float) -> float:
    return (
        x ** (r + 1.0) / (r + 1.0)
        + 0.5 * x**r
        + r / 12.0 * x ** (r - 1.0)
        - r * (r - 1.0) * (r - 2.0) / 720.0 * x ** (r - 3.0)
    )


@dataclass(frozen=True)
class _Table(Twin):
    """Any weighted schedule: ``w_j`` and ``W_j`` looked up in tables of ``total_steps``."""

    token: int  # one per table: two schedules never share a compiled update by accident
    weights: tuple[float, ...] = field(compare=False, repr=False)
    totals: tuple[float, ...] = field(compare=False, repr=False)

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        w = jnp.asarray(self.weights, jnp.result_type(float))
        total = jnp.asarray(self.totals, jnp.result_type(float))
        inside = t < len(self.totals)
        gap = _loop_sum(lambda j: w[jnp.minimum(j, len(self.weights) - 1)], t - dt + 1, dt)
        now = total[jnp.minimum(t, len(self.totals) - 1)]
        weight = jnp.where(now > 0, gap / jnp.where(now > 0, now, 1.0), 1.0)
        weight = jnp.where(inside, weight, jnp.nan)
        return 1.0 - weight, weight


def more_twin(schedule: Schedule) -> Twin | None:
    """The twin of a weighted or BEMA schedule, or ``None`` for any other schedule.

    Raises:
        TypeError: a weighted schedule other than ``polynomial`` built without ``total_steps``.
    """
    s: Any = schedule
    if isinstance(schedule, averages.BEMA):
        return BemaTwin(
            s.ema_power, s.bias_power, s.lag, s.multiplier, s.min_ema_multiplier,
            s.anchor_step, s.per_update,
        )  # fmt: skip
    if type(schedule) is _weighted._Polynomial:
        exact = math.fsum(float(j) ** s.r for j in range(1, _EXACT_UP_TO + 1))
        return _PolynomialSum(s.r, exact - _em64(s.r, float(_EXACT_UP_TO)))
    if isinstance(schedule, _weighted._Weighted):
        if s.total_steps is None:
            raise TypeError(
                f"decay {s.name}: polyak.jax looks its weights up in a table built on the host; "
                f"build it with total_steps=<the run's optimizer steps>"
            )
        weights = np.array([0.0] + [s._w(j) for j in range(1, s.total_steps + 1)])
        totals = np.cumsum(weights)
        return _Table(next(_tokens), tuple(weights.tolist()), tuple(totals.tolist()))
    return None
