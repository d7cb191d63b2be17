"""Horizon conversions (decay, half-life, EDM2 sigma_rel) and argument checks for schedules.

Pure Python (``math`` only), so the schedules work without NumPy or torch.
"""

from __future__ import annotations

import math
import numbers
import operator

__all__ = [
    "decay_to_halflife",
    "gamma_to_sigma_rel",
    "halflife_to_decay",
    "scale_decay",
    "sigma_rel_to_gamma",
]

#: Largest EDM2 relative width: the uniform average (``gamma = 0``) has ``sigma_rel = 12**-0.5``.
SIGMA_REL_MAX = 12.0**-0.5


def real(name: str, value: object) -> float:
    """Return ``value`` as a finite float (TypeError for non-numbers and bools)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def real_in(
    name: str, value: object, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    """Return ``value`` as a float after checking it lies in the interval from ``lo`` to ``hi``."""
    out = real(name, value)
    if out < lo or out > hi or (lo_open and out == lo) or (hi_open and out == hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return out


def positive(name: str, value: object) -> float:
    """Return ``value`` as a float after checking it is finite and > 0."""
    out = real(name, value)
    if out <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def integer(name: str, value: object, minimum: int) -> int:
    """Return ``value`` (a Python or NumPy integer, not a bool) as an int ``>= minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r} (bool)")
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {value!r} ({type(value).__name__})"
        ) from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def halflife_to_decay(halflife_steps: float) -> float:
    """Per-step decay whose weights halve every ``halflife_steps`` steps.

    ``decay = 0.5 ** (1 / h)``: after ``h`` updates an old value keeps half its weight. This is
    Composer's and EDM's (``0.5 ** (batch / halflife_img)``) parameterisation.

    Args:
        halflife_steps: the half-life ``h > 0`` in optimizer steps (may be fractional).

    Returns:
        The decay in ``(0, 1)``.

    Examples:
        >>> round(halflife_to_decay(693.0), 6)
        0.999
        >>> halflife_to_decay(1)
        0.5
    """
    return 0.5 ** (1.0 / positive("halflife_steps", halflife_steps))


def decay_to_halflife(decay: float) -> float:
    """Half-life in steps of a constant decay: ``ln(0.5) / ln(decay)`` (about ``0.693/(1-decay)``).

    Args:
        decay: a decay in the open interval ``(0, 1)``.

    Returns:
        The number of steps after which a value keeps half its weight.

    Examples:
        >>> round(decay_to_halflife(0.999), 1)
        692.8
        >>> decay_to_halflife(0.5)
        1.0
    """
    d = real_in("decay", decay, 0.0, 1.0, lo_open=True, hi_open=True)
    return math.log(0.5) / math.log(d)


def scale_decay(decay: float, kappa: float) -> float:
    """EMA scaling rule: ``decay ** kappa`` (Busbridge et al., "How to Scale Your EMA", 2023).

    When each update covers ``kappa`` times as many samples (batch size, world size, gradient
    accumulation or ``update_every`` multiplied by ``kappa``), ``decay ** kappa`` keeps the horizon
    the same in samples. It is exact for ``kappa`` EMA steps towards a fixed value.

    Args:
        decay: the reference decay in ``[0, 1]``.
        kappa: the ratio ``> 0`` of samples per update to the reference setting.

    Returns:
        The scaled decay.

    Examples:
        >>> round(scale_decay(0.999, 8), 5)
        0.99203
        >>> scale_decay(0.25, 0.5)
        0.5
    """
    d = real_in("decay", decay, 0.0, 1.0)
    return d ** positive("kappa", kappa)


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 relative width of a power-function average (Karras et al. 2024, Eq. 122-123).

    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``: the standard deviation of the
    averaging profile ``tau**gamma`` on ``[0, t]`` divided by ``t``.

    Args:
        gamma: the exponent ``>= 0`` (0 is the uniform average, ``sigma_rel = 12**-0.5``).

    Returns:
        ``sigma_rel`` in ``(0, 12**-0.5]``.

    Examples:
        >>> round(gamma_to_sigma_rel(6.94), 3)
        0.1
        >>> gamma_to_sigma_rel(0.0) == 12**-0.5
        True
    """
    g = real("gamma", gamma)
    if g < 0.0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if g == 0.0:
        return SIGMA_REL_MAX
    # Factored so that huge gammas do not overflow.
    return math.sqrt(g + 1.0) / ((g + 2.0) * math.sqrt(g + 3.0))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 exponent ``gamma`` of the power-function average of relative width ``sigma_rel``.

    ``gamma`` is the largest real root of ``g**3 + 7 g**2 + (16 - s**-2) g + (12 - s**-2) = 0``
    (Karras et al. 2024, Eq. 126 and Algorithm 2), found by Newton's method from ``g = 1/s``, which
    lies right of the root (``sigma_rel(g) < 1/g``), where the cubic is increasing and convex: the
    iterates fall monotonically to the root and stop at full float precision.

    Args:
        sigma_rel: the relative width in ``(0, 12**-0.5)``.

    Returns:
        ``gamma > 0``.

    Examples:
        >>> round(sigma_rel_to_gamma(0.05), 2), round(sigma_rel_to_gamma(0.10), 2)
        (16.97, 6.94)
    """
    s = real_in("sigma_rel", sigma_rel, 0.0, SIGMA_REL_MAX, lo_open=True, hi_open=True)
    # In u = g * s the cubic times s**3 reads u**3 + 7 s u**2 + (16 s**2 - 1) u + 12 s**3 - s:
    # no s**-2 to overflow for tiny widths, and u = 1 (g = 1/s) starts right of the root.
    u = 1.0
    for _ in range(10_000):
        f = ((u + 7.0 * s) * u + (16.0 * s * s - 1.0)) * u + (12.0 * s * s - 1.0) * s
        slope = (3.0 * u + 14.0 * s) * u + (16.0 * s * s - 1.0)
        nxt = u - f / slope
        if not nxt < u:  # no further descent: converged (or rounding noise at the root)
            break
        u = nxt
    g = u / s
    if not math.isfinite(g):
        raise ValueError(
            f"sigma_rel={sigma_rel!r} is too small: its exponent gamma (about 1/sigma_rel) is "
            "not a finite float; a width this small is the live weights (decay 0)"
        )
    return g


def decay_to_sigma_rel(decay: float, total_steps: float) -> float:
    """EDM2-style relative width of a constant-decay EMA after ``total_steps`` steps.

    The weight a constant-decay EMA gives to the value ``k`` steps old is ``(1-d) d**k``: a
    geometric distribution of age with standard deviation ``sqrt(d) / (1 - d)``. Divided by the
    run length it is comparable with EDM2's ``sigma_rel`` (Karras et al., "Analyzing and
    Improving the Training Dynamics of Diffusion Models", CVPR 2024, Sec. 3), valid while the
    window is short against the run.

    Args:
        decay: a decay in ``(0, 1)``.
        total_steps: the run length ``> 0`` in steps.

    Examples:
        >>> round(decay_to_sigma_rel(0.9999, 100_000), 3)
        0.1
    """
    d = real_in("decay", decay, 0.0, 1.0, lo_open=True, hi_open=True)
    return math.sqrt(d) / (1.0 - d) / positive("total_steps", total_steps)


def sigma_rel_to_decay(sigma_rel: float, total_steps: float) -> float:
    """The constant decay whose EMA has relative width ``sigma_rel`` after ``total_steps`` steps.

    Inverse of :func:`decay_to_sigma_rel`: solves ``sqrt(d)/(1-d) = sigma_rel * total_steps``.

    Examples:
        >>> round(sigma_rel_to_decay(0.1, 100_000), 6)
        0.9999
    """
    w = positive("sigma_rel", sigma_rel) * positive("total_steps", total_steps)
    # sqrt(d) = x solves w x**2 + x - w = 0 (x in (0, 1)).
    x = (-1.0 + math.sqrt(1.0 + 4.0 * w * w)) / (2.0 * w)
    return x * x
