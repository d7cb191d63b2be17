"""Naive float64 references: every kernel and class must match these loops.

They are written for clarity, not speed: one Python loop over steps, NumPy float64 arithmetic,
the textbook form of each rule (no lerp tricks, no closed forms).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def ema(values: Sequence[np.ndarray], decays: Sequence[float], init: np.ndarray) -> np.ndarray:
    """avg_0 = init; avg_i = d_i * avg_{i-1} + (1 - d_i) * values_i, in float64."""
    avg = np.asarray(init, dtype=np.float64).copy()
    for v, d in zip(values, decays, strict=True):
        avg = d * avg + (1.0 - d) * np.asarray(v, dtype=np.float64)
    return avg


def gap_decay(per_step: Callable[[int], float], t: int, dt: int) -> float:
    """Decay for an update covering steps t-dt+1..t: the product of the per-step decays."""
    out = 1.0
    for j in range(t - dt + 1, t + 1):
        out *= per_step(j)
    return out


def timeline_average(
    values: Sequence[np.ndarray],
    per_step: Callable[[int], float],
    init: np.ndarray,
    update_every: int = 1,
    start_step: int = 0,
) -> np.ndarray:
    """The average after feeding values[t-1] at optimizer step t = 1..T (float64).

    Updates happen when ``t - last >= update_every``; at ``t <= start_step`` they copy; after,
    the schedule sees ``t - start_step`` and the gap ``min(t - last, t - start_step)``.
    """
    avg = np.asarray(init, dtype=np.float64).copy()
    last = 0
    for t, v in enumerate(values, start=1):
        if t - last < update_every:
            continue
        if t <= start_step:
            d = 0.0
        else:
            rel = t - start_step
            d = gap_decay(per_step, rel, min(t - last, rel))
        avg = d * avg + (1.0 - d) * np.asarray(v, dtype=np.float64)
        last = t
    return avg


def bema(values: Sequence[np.ndarray], spec, update_every: int = 1) -> dict[int, np.ndarray]:
    """Block & Zhang's BEMA ("EMA Without the Lag", 2025) in float64 (``spec``: the fields of a
    ``polyak.averages.BEMA``), the EMA part over each gap as the product of per-step
    decays (per_update: one beta_t per update), the anchor at the update reaching anchor_step.

    values[0] is theta at construction, values[t] after optimizer step t. Returns BEMA_t at
    every update step t."""
    rho, gamma, kappa, eta = spec.lag, spec.multiplier, spec.ema_power, spec.bias_power
    tau = spec.anchor_step

    def beta(t):
        return min(1.0, max(spec.min_ema_multiplier, (rho + gamma * t) ** -kappa))

    ema = values[0].astype(np.float64)
    anchor = ema.copy()
    out, last = {}, 0
    for t in range(update_every, len(values), update_every):
        theta = values[t].astype(np.float64)
        if t - (t - last) < tau:  # the gap reaches the anchor step: both start from here
            ema, anchor = theta.copy(), theta.copy()
        else:
            decay = 1.0 - beta(t)
            if not spec.per_update:
                decay = np.prod([1.0 - beta(j) for j in range(last + 1, t + 1)])
            ema = decay * ema + (1.0 - decay) * theta
        last = t
        out[t] = ema + (rho + gamma * t) ** -eta * (theta - anchor)
    return out
