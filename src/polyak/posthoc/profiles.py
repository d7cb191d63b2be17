"""Weight profiles of averages over training time, and EDM2's least-squares fit of one by others.

An average kept during training is a weighted mean of the live weights seen so far. Let time
``tau`` run over optimizer steps, with the live weights held constant over each step
(``theta(tau) = theta_s`` for ``s - 1 < tau <= s``). Then the average at time ``t`` is
``integral p(tau) theta(tau) dtau`` for a *profile* ``p >= 0`` of unit mass on ``[0, t]``:

* EDM2's power-function average (:func:`polyak.schedules.power`) has
  ``p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`` (Karras et al. 2024, Eq. 121). Its update
  ``avg <- d avg + (1 - d) theta_t`` with ``d = ((t - 1) / t)**(gamma + 1)`` gives step ``s``
  the weight ``(s**(gamma+1) - (s-1)**(gamma+1)) / t**(gamma+1)``, which is exactly the mass of
  ``p`` on ``(s - 1, s]``: the profile describes the discrete average exactly, not approximately.
* A constant-decay EMA, debiased (:func:`polyak.schedules.debiased`), has
  ``p(tau) = lam exp(-lam (t - tau)) / (1 - exp(-lam t))`` with ``lam = -ln(decay)``: its mass on
  ``(s - 1, s]`` is ``(1 - decay) decay**(t - s) / (1 - decay**t)``. The copy-initialised EMA
  differs only by the weight ``decay**t`` it leaves on the initial weights.

Given snapshots of power averages ``(t_i, gamma_i)``, the combination ``sum_i x_i avg_i`` has the
profile ``sum_i x_i p_i``. EDM2 (Sec. 3.2, App. C.3) chooses ``x`` to minimise the L2 distance
``||sum_i x_i p_i - p_r||`` to a target profile ``p_r``: the normal equations ``A x = b`` with
``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_r>``, and then rescale ``x`` to sum to 1 so that a
constant weight stream is returned unchanged. Between power profiles, with ``t_a <= t_b``,

    <p_a, p_b> = (g_a + 1)(g_b + 1) (t_a / t_b)**g_b / ((g_a + g_b + 1) t_b)      (EDM2 Eq. 151)

(a ratio ``t_a / t_b <= 1``, so nothing overflows). Inner products with an exponential profile
are computed by Gauss-Legendre quadrature on panels that shrink geometrically towards the peak.

NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from polyak._horizon import real_in
from polyak.schedules import gamma_to_sigma_rel, sigma_rel_to_gamma

__all__ = [
    "Solution",
    "Target",
    "power_inner",
    "profile_masses",
    "profile_sigma_rel",
    "solve",
    "target_masses",
]

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(24)
_PANELS = 64  # [2**-k-1, 2**-k] for k < 64, then [0, 2**-64]


@dataclass(frozen=True)
class Target:
    """The average to reconstruct: a power profile (``gamma``) or a constant ``decay``.

    Build it with :meth:`make`. ``label`` names it (``"sigma_rel=0.08"``, ``"decay=0.9995"``).
    """

    gamma: float | None = None
    decay: float | None = None

    @classmethod
    def make(
        cls,
        sigma_rel: float | None = None,
        *,
        gamma: float | None = None,
        decay: float | None = None,
    ) -> Target:
        """A target from exactly one of ``sigma_rel`` (in ``(0, 12**-0.5)``), ``gamma >= 0`` and
        ``decay`` (per optimizer step, in ``(0, 1)``)."""
        given = {"sigma_rel": sigma_rel, "gamma": gamma, "decay": decay}
        if sum(v is not None for v in given.values()) != 1:
            raise ValueError(f"give exactly one of sigma_rel, gamma and decay, got {given}")
        if sigma_rel is not None:
            return cls(gamma=sigma_rel_to_gamma(sigma_rel))
        if gamma is not None:
            g = real_in("gamma", gamma, 0.0, math.inf)
            return cls(gamma=g)
        return cls(decay=real_in("decay", decay, 0.0, 1.0, lo_open=True, hi_open=True))

    @property
    def sigma_rel(self) -> float | None:
        """EDM2's relative width of a power target (``None`` for a constant decay)."""
        return None if self.gamma is None else gamma_to_sigma_rel(self.gamma)

    @property
    def label(self) -> str:
        if self.gamma is None:
            return f"decay={self.decay!r}"
        return f"sigma_rel={self.sigma_rel:.6g}"


@dataclass(frozen=True)
class Solution:
    """EDM2's least-squares combination of snapshots for one target.

    Attributes:
        target: what was fitted.
        t: the target's time (optimizer steps since averaging started).
        ts, gammas: the snapshots used (time, exponent), in the order of ``coefficients``.
        coefficients: ``x``, summing to 1 (float64).
        fit: relative L2 distance ``||sum_i x_i p_i - p_r|| / ||p_r||`` between the achieved and
            the target profile; 0 is a perfect fit. About 2e-3 with 20 snapshots of
            ``sigma_rel`` 0.05 and 0.10 for a 0.08 target, 5e-4 with 40.
        amplification: ``sum_i |x_i|``, the factor by which errors in the snapshots (e.g.
            float16 rounding) can grow in the result.
    """

    target: Target
    t: float
    ts: np.ndarray = field(repr=False)
    gammas: np.ndarray = field(repr=False)
    coefficients: np.ndarray = field(repr=False)
    fit: float
    amplification: float


def power_inner(t_a: object, g_a: object, t_b: object, g_b: object) -> np.ndarray:
    """``<p_a, p_b>`` of power profiles (EDM2 Eq. 151), broadcast over NumPy arrays.

    Examples:
        >>> float(power_inner(1.0, 0.0, 1.0, 0.0))  # the uniform profile on [0, 1]
        1.0
    """
    ta, ga, tb, gb = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    ta, ga, tb, gb = np.broadcast_arrays(ta, ga, tb, gb)
    first = ta <= tb  # order each pair so that the ratio is <= 1
    lo, hi = np.where(first, ta, tb), np.where(first, tb, ta)
    g_hi = np.where(first, gb, ga)
    # factored so that the huge exponents of very narrow profiles (sigma_rel -> 0) do not overflow
    return (ga + 1.0) / (ga + gb + 1.0) * (gb + 1.0) * (lo / hi) ** g_hi / hi


def _rate(decay: float) -> float:
    return -math.log(decay)


def _exp_norm2(t: float, lam: float) -> float:
    """``<q, q>`` of the exponential profile: ``lam (1 - e^(-2 lam t)) / (2 (1 - e^(-lam t))^2)``"""
    return lam * -math.expm1(-2.0 * lam * t) / (2.0 * math.expm1(-lam * t) ** 2)


def _exp_power_inner(ts: np.ndarray, gammas: np.ndarray, t: float, lam: float) -> np.ndarray:
    """``<p_i, q>`` for power profiles ``(t_i, gamma_i)`` and the exponential profile ``q``.

    With ``m = min(t_i, t)`` and ``tau = m (1 - y)`` the integral is
    ``(g+1) lam (m/t_i)**(g+1) e^{-lam (t-m)} / (1 - e^{-lam t}) * J``, where
    ``J = int_0^1 (1-y)**g e^{-lam m y} dy`` has its mass near ``y = 0`` (width ~1/(g + lam m)):
    panels ``[2**-(k+1), 2**-k]`` resolve it at every scale.
    """
    edges = 2.0 ** -np.arange(_PANELS + 1, dtype=np.float64)  # 1, 1/2, ..., 2**-64
    lo, hi = np.append(edges[1:], 0.0), np.append(edges[:-1], edges[-1])
    half = (hi - lo)[:, None] / 2.0
    y = (lo[:, None] + half * (_NODES[None, :] + 1.0)).ravel()
    w = (half * _WEIGHTS[None, :]).ravel()
    m = np.minimum(ts, t)
    g = gammas[:, None]
    integrand = np.exp(g * np.log1p(-y)[None, :] - lam * m[:, None] * y[None, :])
    j = integrand @ w
    scale = (gammas + 1.0) * lam * (m / ts) ** (gammas + 1.0) * np.exp(-lam * (t - m))
    return scale * j / -math.expm1(-lam * t)


def _target_terms(ts: np.ndarray, gammas: np.ndarray, t: float, target: Target) -> tuple:
    """``b`` and ``<p_r, p_r>`` for the target at time ``t``."""
    if target.gamma is not None:
        b = power_inner(ts, gammas, t, target.gamma)
        return b, float(power_inner(t, target.gamma, t, target.gamma))
    assert target.decay is not None
    lam = _rate(target.decay)
    return _exp_power_inner(ts, gammas, t, lam), _exp_norm2(t, lam)


def solve(ts: object, gammas: object, t: float, target: Target) -> Solution:
    """EDM2's normalised least-squares combination of power-average snapshots.

    Solves ``A x = b`` (``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_r>``) in float64 after scaling
    ``A`` to unit diagonal, then rescales ``x`` to sum to 1 (as EDM2's released solver does;
    its Algorithm 3 and ema-pytorch omit this, which scales a constant stream by ``sum x``).
    Snapshots must satisfy ``0 < t_i <= t`` (the caller selects them).

    Args:
        ts: snapshot times (optimizer steps since averaging started), all in ``(0, t]``.
        gammas: their power exponents.
        t: the target's time.
        target: the :class:`Target`.

    Returns:
        A :class:`Solution` (coefficients, fit, amplification).

    Examples:
        >>> s = solve([100.0, 100.0], [16.97, 6.94], 100.0, Target.make(gamma=6.94))
        >>> [round(float(x), 6) + 0.0 for x in s.coefficients], bool(s.fit < 1e-6)
        ([0.0, 1.0], True)

    References:
        Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
        CVPR 2024, Sec. 3.2 and App. C.3.
    """
    ts_a = np.asarray(ts, dtype=np.float64).ravel()
    gs_a = np.asarray(gammas, dtype=np.float64).ravel()
    if ts_a.size == 0 or ts_a.size != gs_a.size:
        raise ValueError(f"need one gamma per snapshot time and >= 1 snapshot, got {ts_a.size}")
    if not (np.all(ts_a > 0) and np.all(ts_a <= t)):
        raise ValueError(f"snapshot times must lie in (0, {t}], got {ts_a.tolist()}")
    a = power_inner(ts_a[:, None], gs_a[:, None], ts_a[None, :], gs_a[None, :])
    b, norm2 = _target_terms(ts_a, gs_a, float(t), target)
    d = 1.0 / np.sqrt(np.diag(a))
    scaled = np.linalg.lstsq(a * d[:, None] * d[None, :], b * d, rcond=None)[0]
    x = scaled * d
    total = x.sum()
    if not abs(total) > 1e-12:
        raise ValueError(
            f"the snapshots cannot represent {target.label} at t={t}: the least-squares "
            f"combination sums to {total:.3g}"
        )
    x = x / total
    residual = float(x @ a @ x - 2.0 * x @ b + norm2)
    fit = math.sqrt(max(residual, 0.0) / norm2)
    return Solution(target, float(t), ts_a, gs_a, x, fit, float(np.abs(x).sum()))


def profile_masses(
    edges: object, ts: object, gammas: object, weights: object | None = None
) -> np.ndarray:
    """Mass of ``sum_i w_i p_i`` (power profiles) on each bin ``[edges[k], edges[k+1]]``.

    Exact per bin (the profile's antiderivative is ``(tau / t_i)**(gamma_i + 1)``); divide by
    the bin widths for a density. ``weights`` defaults to one profile per column: the result is
    then ``(bins, snapshots)``.
    """
    e = np.asarray(edges, dtype=np.float64)
    ts_a = np.asarray(ts, dtype=np.float64).ravel()
    gs_a = np.asarray(gammas, dtype=np.float64).ravel()
    cdf = (np.minimum(e[:, None], ts_a[None, :]) / ts_a[None, :]) ** (gs_a[None, :] + 1.0)
    masses = np.diff(cdf, axis=0)
    return masses if weights is None else masses @ np.asarray(weights, dtype=np.float64)


def target_masses(edges: object, t: float, target: Target) -> np.ndarray:
    """Mass of the target profile at time ``t`` on each bin ``[edges[k], edges[k+1]]``."""
    e = np.minimum(np.asarray(edges, dtype=np.float64), t)
    if target.gamma is not None:
        return np.diff((e / t) ** (target.gamma + 1.0))
    assert target.decay is not None
    lam = _rate(target.decay)
    # antiderivative (e^{-lam (t - tau)} - e^{-lam t}) / (1 - e^{-lam t}), written with expm1
    cdf = (np.expm1(-lam * (t - e)) - math.expm1(-lam * t)) / -math.expm1(-lam * t)
    return np.diff(cdf)


def profile_sigma_rel(target: Target, t: float) -> float:
    """EDM2's relative width of the target's profile at time ``t``: the standard deviation of
    the time ``tau`` it weighs, over ``t``. A power target has its own ``sigma_rel``; for a
    constant decay (rate ``lam = -ln(decay)``, ``a = lam t``) the profile is an exponential
    truncated to ``[0, t]``, of variance ``(1 - a**2 e**-a / (1 - e**-a)**2) / lam**2``: about
    ``1 / a`` for a run much longer than the horizon, up to the uniform average's ``12**-0.5``.

    Examples:
        >>> round(profile_sigma_rel(Target.make(0.1), 1000.0), 4)
        0.1
        >>> round(profile_sigma_rel(Target.make(decay=0.999), 100_000.0), 4)
        0.01
        >>> round(profile_sigma_rel(Target.make(decay=1 - 1e-12), 10.0), 4)  # nearly uniform
        0.2887
    """
    if target.gamma is not None:
        return gamma_to_sigma_rel(target.gamma)
    assert target.decay is not None
    a = _rate(target.decay) * t
    if a < 0.05:  # the closed form cancels; its series
        share = a * a / 12.0 - a**4 / 240.0 + a**6 / 6048.0
    else:
        share = 1.0 - a * a * math.exp(-a) / math.expm1(-a) ** 2
    return math.sqrt(max(share, 0.0)) / a
