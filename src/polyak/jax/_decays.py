"""Traced twins of :mod:`polyak.schedules`: ``(t, dt) -> (decay, 1 - decay)`` in ``jax.numpy``.

``polyak.schedules`` computes a decay in Python floats; under ``jax.jit`` the step is a traced
integer, so every built-in schedule gets here the same formula over the same gap ``dt`` (steps
``t-dt+1 .. t``), written with ``jax.numpy`` and ``lax`` on traced ``t`` and ``dt``: no retracing
per step and no transfer to the host.

Precision. JAX computes in float32 (unless ``jax_enable_x64``). The update reads the weight
``1 - decay``, which for a decay near 1 would lose most of its digits if taken as ``1 - decay``
of a float32 decay (0.9999 is stored as 0.99989998). So each twin forms the log of the decay
from constants precomputed in float64 on the host, and returns ``exp(L)`` and ``-expm1(L)``:
both are then within a few float32 ulps, the weight in relative terms. Schedules without a
closed form over a gap (inverse power, the cosine ramp) sum per-step logs in a traced loop over
the steps where the schedule still moves, and add the flat part in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from polyak import schedules as _schedules
from polyak.schedules import Schedule

__all__ = ["Twin", "twin"]

_INT_MAX = 2**31 - 1  # steps are int32 on the device

Pair = tuple[jax.Array, jax.Array]


def _float() -> Any:
    return jnp.result_type(float)  # float32, or float64 under jax_enable_x64


def _f(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(_float())


def _from_log(log_decay: jax.Array) -> Pair:
    return jnp.exp(log_decay), -jnp.expm1(log_decay)


def _times(count: jax.Array, log: float | jax.Array) -> jax.Array:
    """``count * log`` with ``0 * -inf = 0`` (a decay of 0 applied over no step)."""
    return jnp.where(count > 0, _f(count) * log, 0.0)


def _log(x: float) -> float:
    return math.log(x) if x > 0.0 else -math.inf


class Twin:
    """Base of the traced twins: frozen, hashable, compared by value (they are jit cache keys)."""

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        raise NotImplementedError


@dataclass(frozen=True)
class _Geometric(Twin):
    """``constant(d)`` and ``halflife``: ``d ** dt``; for ``dt = 1`` exactly ``d`` and ``1 - d``
    as rounded from float64, which other libraries pass as ``1 - d`` too."""

    decay: float

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        decay, weight = _from_log(_f(dt) * _log(self.decay))
        one = dt == 1
        return jnp.where(one, self.decay, decay), jnp.where(one, 1.0 - self.decay, weight)


@dataclass(frozen=True)
class _Power(Twin):
    """``power``/``uniform``: ``(1 - dt/t) ** (gamma + 1)``."""

    exponent: float

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        return _from_log(self.exponent * jnp.log1p(-_f(dt) / _f(t)))


@dataclass(frozen=True)
class _Debiased(Twin):
    """``d**dt (1 - d**(t-dt)) / (1 - d**t)``, whose weight is ``expm1(dt ln d)/expm1(t ln d)``."""

    log_decay: float

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        weight = jnp.expm1(_f(dt) * self.log_decay) / jnp.expm1(_f(t) * self.log_decay)
        weight = jnp.where(dt == t, 1.0, weight)  # also d = 0: -1/-1
        return 1.0 - weight, weight


@dataclass(frozen=True)
class _Warmup(Twin):
    """``warmup``: period ``p`` (0-based) has the cap ``c_p = min(d, (1+n)/(10+n))``,
    ``n = p + count_from``; a step of that period decays by ``c_p ** (1/period)``.

    Over a gap: the partial first and last periods, then the whole periods between them, whose
    ramp part telescopes, ``prod_{n=a..b} (1+n)/(10+n) = prod_{k=1..9} (a+k)/(b+1+k)``, and whose
    capped part is ``d ** count``.
    """

    log_decay: float
    period: int
    count_from: int
    ramp_end: int  # first counter n whose ramp value reaches d (the cap holds from there)

    def _log_cap(self, n: jax.Array) -> jax.Array:
        return jnp.where(n < self.ramp_end, jnp.log1p(-9.0 / (10.0 + _f(n))), self.log_decay)

    def _ramp(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``sum_{n=a..b} log((1+n)/(10+n))`` (0 when ``b < a``)."""
        m = _f(jnp.maximum(b + 1 - a, 0))
        k = jnp.arange(1, 10, dtype=_float())
        return jnp.sum(jnp.log1p(-m / (_f(b) + 1.0 + k)))

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        period, c = self.period, self.count_from
        before = t - dt
        first, last = before // period, (t - 1) // period
        in_first = jnp.minimum(t, (first + 1) * period) - before
        in_last = t - last * period
        log = _f(in_first) / period * self._log_cap(first + c)
        log += jnp.where(last > first, _f(in_last) / period * self._log_cap(last + c), 0.0)
        lo, hi = first + 1 + c, last - 1 + c  # whole periods strictly inside the gap
        log += self._ramp(lo, jnp.minimum(hi, self.ramp_end - 1))
        log += _times(hi - jnp.maximum(lo, self.ramp_end) + 1, self.log_decay)
        return _from_log(log)


def _loop_sum(fn: Callable[[jax.Array], jax.Array], lo: jax.Array, count: jax.Array) -> jax.Array:
    """``sum(fn(lo + i) for i in range(count))`` with a traced ``count`` (a while loop)."""
    return lax.fori_loop(0, count, lambda i, total: total + fn(lo + i), jnp.zeros((), _float()))


@dataclass(frozen=True)
class _InversePower(Twin):
    """``inverse_power``: step ``j`` decays by ``clamp(1 - (1 + (j-1)/inv_gamma)**-power)``;
    steps from ``cap_from`` on are capped at ``decay`` (summed in closed form)."""

    log_decay: float
    log_min_decay: float
    inv_gamma: float
    power: float
    cap_from: int

    def _log_step(self, j: jax.Array) -> jax.Array:
        tail = jnp.exp(-self.power * jnp.log1p(_f(j - 1) / self.inv_gamma))
        return jnp.clip(jnp.log1p(-tail), self.log_min_decay, self.log_decay)

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        lo = t - dt + 1
        moving = jnp.clip(jnp.minimum(t, self.cap_from - 1) - lo + 1, 0, None)
        log = _loop_sum(self._log_step, lo, moving) + _times(dt - moving, self.log_decay)
        return _from_log(log)


@dataclass(frozen=True)
class _Cosine(Twin):
    """``cosine``: step ``j`` decays by ``end - (end - start) cos^2(pi k / 2K)``,
    ``k = min(j-1, K)``; steps after ``K`` decay by ``end``."""

    start: float
    end: float
    total_steps: int

    def _log_step(self, j: jax.Array) -> jax.Array:
        k = _f(jnp.minimum(j - 1, self.total_steps))
        ramp = jnp.cos(jnp.pi * k / (2.0 * self.total_steps)) ** 2  # = (cos(pi k/K) + 1) / 2
        return jnp.log1p(-((1.0 - self.end) + (self.end - self.start) * ramp))

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        flat = jnp.maximum(0, t - jnp.maximum(t - dt, self.total_steps))
        log = _loop_sum(self._log_step, t - dt + 1, dt - flat)
        return _from_log(log + _times(flat, _log(self.end)))


@dataclass(frozen=True)
class _Traced(Twin):
    """A user's callable ``(t, dt) -> decay``, called on traced integers. A result outside
    ``[0, 1]`` gives a NaN weight, so the average turns NaN instead of silently wrong."""

    fn: Callable[[Any, Any], Any]

    def __call__(self, t: jax.Array, dt: jax.Array) -> Pair:
        decay = _f(self.fn(t, dt))
        ok = (decay >= 0.0) & (decay <= 1.0)
        return decay, jnp.where(ok, 1.0 - decay, jnp.nan)


def _warmup_ramp_end(decay: float) -> int:
    """First ``n >= 0`` with ``(1+n)/(10+n) >= decay`` (as ``min`` compares them in float64)."""
    if decay >= 1.0:
        return _INT_MAX
    n = max(0, math.floor((10.0 * decay - 1.0) / (1.0 - decay)) - 1)
    while (1.0 + n) / (10.0 + n) < decay:
        n += 1
    return min(n, _INT_MAX)


def _inverse_power_cap_from(s: Any) -> int:
    """A step from which ``1 - (1 + (j-1)/inv_gamma)**-power >= decay`` (one step late at most:
    the loop clamps the steps before it exactly)."""
    if s.decay >= 1.0:
        return _INT_MAX
    j = 1.0 + s.inv_gamma * ((1.0 - s.decay) ** (-1.0 / s.power) - 1.0)
    return int(min(math.ceil(j) + 1, _INT_MAX)) if math.isfinite(j) else _INT_MAX


def twin(schedule: Schedule) -> Twin:
    """The traced twin of a schedule of :mod:`polyak.schedules`, or of a callable ``(t, dt)``.

    Raises:
        TypeError: a ``Schedule`` subclass defined elsewhere (its formula is not known here), or
            a callable that JAX cannot trace on integer scalars.
    """
    from polyak.jax._more_decays import more_twin  # weighted schedules and BEMA

    extra = more_twin(schedule)
    if extra is not None:
        return extra
    kind = schedule.kind if type(schedule).__module__ == _schedules.__name__ else None
    s: Any = schedule
    if kind == "constant":
        return _Geometric(s.decay)
    if kind == "halflife":
        return _Geometric(s(1))
    if kind in ("power", "uniform"):
        return _Power(s.gamma + 1.0)
    if kind == "debiased":
        return _Debiased(_log(s.decay))
    if kind == "warmup":
        return _Warmup(_log(s.decay), s.period, s.count_from, _warmup_ramp_end(s.decay))
    if kind == "inverse_power":
        cap_from = _inverse_power_cap_from(s)
        return _InversePower(_log(s.decay), _log(s.min_decay), s.inv_gamma, s.power, cap_from)
    if kind == "cosine":
        return _Cosine(s.start, s.end, s.total_steps)
    if kind == "callable":
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        try:
            out = jax.eval_shape(s.fn, scalar, scalar)
        except Exception as e:
            raise TypeError(
                f"decay {s.name!r}: polyak.jax calls it on traced int32 steps (t, dt) under "
                f"jax.jit, which failed ({type(e).__name__}: {e}); write it with jax.numpy "
                "operations (no float(), if or min() on t and dt)"
            ) from e
        if getattr(out, "shape", None) != ():
            raise TypeError(f"decay {s.name!r} must return a scalar, got {out!r}")
        return _Traced(s.fn)
    raise TypeError(
        f"polyak.jax has no traced form of the schedule {schedule!r}; use a schedule of "
        "polyak.schedules or a callable (t, dt) -> decay written with jax.numpy"
    )
