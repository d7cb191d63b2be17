"""Merge weights that mean something: LAWA, an EMA, a power average, a learning-rate decay.

Every function takes the optimizer steps of the checkpoints (in order) and returns
:class:`Weights`: one non-negative weight per checkpoint, summing to 1, with a ``label`` and,
for the EMA- and power-equivalent weights, the ``fit`` they reach.

**EMA and power averages from checkpoints** (:func:`ema`, :func:`power`). The average kept
during training at step ``T`` is ``sum_s m_s theta_s`` over the live weights of every step,
with the masses ``m_s`` of :mod:`polyak.posthoc.profiles` (a power profile, or the debiased
constant-decay EMA, both counted from ``start``). Checkpoints hold only some of the steps. With
``F`` the target's cumulative mass (``F(s) = sum_{u <= s} m_u``) and ``C`` the merge's
(``C(s) = sum_{s_j <= s} c_j``), summation by parts gives, for every weight,
``|merge - average| <= max_s |C(s) - F(s)| * sum_s |theta_{s+1} - theta_s|``. The weights
returned minimise that maximum (the Kolmogorov distance, reported as ``fit``): between two
checkpoints ``C`` is held at the middle of the range ``F`` covers there,
``C_j = (F(s_j) + F(s_{j+1} - 1)) / 2`` and ``C_k = 1`` at the last. So each checkpoint takes
half the target's mass of the steps on either side of it (all of it before the first); with a
checkpoint at every step the merge *is* the average (``fit`` 0). When the checkpoints are
snapshots of power averages (a post-hoc store's, ``gammas=``), the coefficients are EDM2's
least-squares ones (:func:`polyak.posthoc.solve`, the same as ``polyak posthoc``).

**WSM** (:func:`wsm`; Tian et al., "WSM: Decay-Free Learning Rate Schedule via Checkpoint
Merging for LLM Pre-training", 2025). Training at a constant learning rate ``eta`` gives
``theta_{s_j} = theta_{s_0} - eta sum_{t < s_j} g_t`` (``t`` from ``s_0``). Decaying the rate
over the last ``D`` steps instead, with multipliers ``w(t)`` (1 before the window), would give
``theta_hat = theta_{s_0} - eta sum_t w(t) g_t``, if the gradients ``g_t`` were the same. The
merge ``sum_j c_j theta_{s_j}`` equals it exactly when ``sum_j c_j = 1`` and each gradient
between checkpoints ``j-1`` and ``j`` gets the weight ``sum_{i >= j} c_i = W_j``, the mean
multiplier over those steps: ``c_0 = 1 - W_1``, ``c_j = W_j - W_{j+1}``, ``c_k = W_k``. The
weights telescope to 1 for every shape; they are non-negative for a non-increasing one.

NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import numpy as np

from polyak._horizon import integer, real
from polyak.posthoc.profiles import Target, solve, target_masses

__all__ = ["Shape", "Weights", "ema", "explicit", "lawa", "power", "wsm"]

Shape = Literal["linear", "cosine", "1-sqrt"]
_SHAPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda u: 1.0 - u,
    "cosine": lambda u: 0.5 * (1.0 + np.cos(np.pi * u)),
    "1-sqrt": lambda u: 1.0 - np.sqrt(u),
}


@dataclass(frozen=True)
class Weights(Sequence[float]):
    """One weight per checkpoint (non-negative, summing to 1), and what they stand for.

    A sequence of floats: pass it to :func:`polyak.merge.merge`.

    Attributes:
        values: the weights (float64).
        label: what they reproduce (``"lawa(k=4)"``, ``"ema(decay=0.999)"``, ...).
        steps: the checkpoints' steps, when the weights were derived from them.
        fit: for :func:`ema` and :func:`power`, the largest difference between the cumulative
            weight the merge gives to the steps up to ``s`` and the target's (0: exact); each
            merged weight is then within ``fit`` times the total distance it travelled during
            training of the target average. ``None`` where the weights are exact by definition.
    """

    values: np.ndarray = field(repr=False)
    label: str
    steps: tuple[int, ...] | None = None
    fit: float | None = None

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, i: int) -> float: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[float]: ...
    def __getitem__(self, i: int | slice) -> float | Sequence[float]:
        if isinstance(i, slice):
            return [float(v) for v in self.values[i]]
        return float(self.values[i])

    def __iter__(self) -> Iterator[float]:
        return (float(v) for v in self.values)

    def __repr__(self) -> str:
        shown = ", ".join(f"{v:.4g}" for v in self.values[:8])
        more = ", ..." if len(self.values) > 8 else ""
        fit = "" if self.fit is None else f", fit={self.fit:.2g}"
        return f"Weights({self.label}: [{shown}{more}]{fit})"


def _make(
    values: np.ndarray, label: str, steps: Sequence[int] | None, fit: float | None
) -> Weights:
    out = np.array(values, dtype=np.float64)
    out[np.abs(out) < 1e-15] = 0.0  # cancellation leftovers of exact zeros
    out.flags.writeable = False
    return Weights(out, label, None if steps is None else tuple(steps), fit)


def explicit(values: Sequence[float]) -> Weights:
    """The given weights, normalised to sum to 1.

    Refused (``ValueError`` naming the position and the reason): a weight that is negative,
    NaN or infinite, no weight at all, or weights that sum to 0.

    Examples:
        >>> explicit([1, 1, 2]).values.tolist()
        [0.25, 0.25, 0.5]
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"weights must be a sequence of numbers, got {values!r:.80}")
    out = []
    for i, v in enumerate(values):
        try:
            x = real(f"weight {i}", v)
        except ValueError:
            raise ValueError(
                f"weight {i} is {v!r}: every weight must be a finite number >= 0"
            ) from None
        if x < 0:
            raise ValueError(
                f"weight {i} is {v!r}: merge weights must be >= 0 (a negative weight "
                "extrapolates away from that checkpoint, which a merge does not do)"
            )
        out.append(x)
    if not out:
        raise ValueError("no weights given: give one per checkpoint")
    total = math.fsum(out)
    if not total > 0:
        raise ValueError(f"the weights {out} sum to 0; give at least one positive weight")
    return _make(np.asarray(out) / total, "explicit", None, None)


def _steps(steps: Sequence[int], minimum: int = 0, *, strict: bool = True) -> list[int]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence | np.ndarray):
        raise TypeError(f"steps must be a sequence of integers, got {steps!r:.80}")
    out = [integer(f"steps[{i}]", s, minimum) for i, s in enumerate(steps)]
    if not out:
        raise ValueError("no checkpoints: give the step of each")
    for i in range(1, len(out)):
        if out[i] < out[i - 1] or (strict and out[i] == out[i - 1]):
            raise ValueError(
                f"the checkpoints' steps must increase: steps[{i}] = {out[i]} follows "
                f"{out[i - 1]}; give the checkpoints in step order, each step once"
            )
    return out


def lawa(steps: Sequence[int] | int, k: int) -> Weights:
    """LAWA: the plain mean of the last ``k`` checkpoints (Kaddour, "Stop Wasting My Time!",
    2022; Sanyal et al., "Early Weight Averaging meets High Learning Rates for LLM
    Pre-training", 2023).

    Args:
        steps: the checkpoints' steps, or their number when the steps are not known.
        k: how many of the latest to average.

    Examples:
        >>> lawa([100, 200, 300, 400], k=2).values.tolist()
        [0.0, 0.0, 0.5, 0.5]
        >>> lawa(3, k=3).values.tolist()  # three checkpoints of unknown steps
        [0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
    """
    k = integer("k", k, 1)
    if not isinstance(steps, Sequence | np.ndarray):
        n = integer("steps", steps, 1)
        if k > n:
            raise ValueError(f"k={k} is more than the {n} checkpoints given")
        return _make(np.where(np.arange(n) >= n - k, 1.0 / k, 0.0), f"lawa(k={k})", None, None)
    s = _steps(steps)
    if k > len(s):
        raise ValueError(f"k={k} is more than the {len(s)} checkpoints given")
    out = np.zeros(len(s))
    out[-k:] = 1.0 / k
    return _make(out, f"lawa(k={k})", s, None)


def _cdf(target: Target, t: float, xs: np.ndarray) -> np.ndarray:
    """The target's mass on ``[0, x]`` for each ``x`` of ``xs`` (non-decreasing)."""
    edges = np.concatenate([[0.0], np.clip(xs, 0.0, t)])
    return np.cumsum(target_masses(edges, t, target))


def _fitted(
    steps: Sequence[int],
    target: Target,
    start: int,
    gammas: Sequence[float] | None,
    label: str,
) -> Weights:
    start = integer("start", start, 0)
    # snapshots of several averages share their steps; live checkpoints have one step each
    s = _steps(steps, start, strict=gammas is None)
    t = float(s[-1] - start)
    if t <= 0:
        raise ValueError(
            f"the last checkpoint (step {s[-1]}) must come after start={start}, where averaging "
            "began"
        )
    if gammas is not None:
        return _from_snapshots(s, target, start, gammas, label)
    rel = np.asarray(s, dtype=np.float64) - start
    lo = _cdf(target, t, rel)  # F at each checkpoint
    hi = _cdf(target, t, np.append(rel[1:] - 1.0, t))  # F just before the next one
    cum = (lo + hi) / 2.0
    cum[-1] = 1.0
    values = np.diff(cum, prepend=0.0)
    before = _cdf(target, t, np.array([rel[0] - 1.0]))[0] if rel[0] >= 1 else 0.0
    fit = max(float(np.max((hi - lo)[:-1] / 2.0, initial=0.0)), float(before))
    return _make(values, label, s, fit)


def _from_snapshots(
    s: list[int], target: Target, start: int, gammas: Sequence[float], label: str
) -> Weights:
    """EDM2's least-squares coefficients for snapshots of power averages (``gammas``)."""
    g = [real(f"gammas[{i}]", x) for i, x in enumerate(gammas)]
    if len(g) != len(s):
        raise ValueError(f"give one gamma per checkpoint: {len(g)} gammas, {len(s)} steps")
    ts = np.asarray(s, dtype=np.float64) - start
    keep = ts > 0  # a snapshot at the start holds no average yet
    t = float(ts[-1])
    x = np.zeros(len(s))
    x[keep] = solve(ts[keep], np.asarray(g)[keep], t, target).coefficients
    # the fit as for live checkpoints: the largest gap between the cumulative weights
    grid = np.unique(np.concatenate([np.linspace(0.0, t, 4097), ts[keep]]))
    achieved = (np.minimum(grid[:, None], ts[keep]) / ts[keep]) ** (np.asarray(g)[keep] + 1.0)
    gap = np.abs(achieved @ x[keep] - _cdf(target, t, grid))
    return _make(x, label, s, float(gap.max()))


def ema(
    steps: Sequence[int], decay: float, *, start: int = 0, gammas: Sequence[float] | None = None
) -> Weights:
    """Weights that make the merge the constant-decay EMA of the run at the last checkpoint.

    The target is the debiased EMA started at step ``start`` (weight ``(1-d) d**(T-s) /
    (1 - d**(T-start))`` on step ``s``; the usual copy-initialised EMA once ``d**(T-start)``
    is negligible), as :func:`polyak.posthoc.reconstruct` defines it. See the module docstring
    for how the weights are chosen and what ``fit`` bounds.

    Args:
        steps: the checkpoints' optimizer steps, increasing.
        decay: the per-step decay, in ``(0, 1)``.
        start: the step where averaging began (the origin of the profile).
        gammas: when the checkpoints are snapshots of power averages (a post-hoc store), each
            one's exponent; the coefficients are then EDM2's least-squares ones.

    Examples:
        >>> w = ema(range(0, 1001), decay=0.99)  # a checkpoint at every step: exact
        >>> w.fit, round(w[-1], 6)
        (0.0, 0.01)
        >>> ema([0, 250, 500, 750, 1000], decay=0.999)  # doctest: +ELLIPSIS
        Weights(ema(decay=0.999): [0.08226, 0.1886, 0.2422, 0.3111, 0.1758], fit=0.17)
    """
    target = Target.make(decay=decay)
    return _fitted(steps, target, start, gammas, f"ema(decay={target.decay!r})")


def power(
    steps: Sequence[int],
    sigma_rel: float,
    *,
    start: int = 0,
    gammas: Sequence[float] | None = None,
) -> Weights:
    """Weights that make the merge EDM2's power-function average of the given ``sigma_rel``
    at the last checkpoint (:func:`polyak.schedules.power`; step ``s`` weighs
    ``((s-start)**(g+1) - (s-start-1)**(g+1)) / (T-start)**(g+1)``).

    Arguments as :func:`ema`.

    Examples:
        >>> w = power(range(0, 4001, 100), sigma_rel=0.1)  # the last 100 steps weigh 18%
        >>> round(sum(w), 12), round(w.fit, 3)
        (1.0, 0.09)

    References:
        Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
        CVPR 2024, Sec. 3.
    """
    target = Target.make(sigma_rel)
    return _fitted(steps, target, start, gammas, f"power(sigma_rel={sigma_rel:g})")


def _multipliers(shape: Shape | Callable[[float], float], u: np.ndarray) -> np.ndarray:
    if callable(shape):
        out = np.array([real(f"shape({x:.4g})", shape(float(x))) for x in u], dtype=np.float64)
        bad = np.flatnonzero((out < 0) | (out > 1))
        if bad.size:
            i = bad[0]
            raise ValueError(
                f"shape({u[i]:.4g}) = {out[i]:g}: a decay shape gives learning-rate "
                "multipliers in [0, 1]"
            )
        return out
    if shape not in _SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(_SHAPES)} or a callable")
    return _SHAPES[shape](u)


def wsm(
    steps: Sequence[int],
    shape: Literal["linear", "cosine", "1-sqrt"] | Callable[[float], float] = "linear",
    *,
    window: int,
) -> Weights:
    """WSM: the merge that stands for decaying the learning rate over the last ``window``
    steps with ``shape``, from the checkpoints of a constant-learning-rate run.

    The decay multiplies the rate of the optimizer step ``t`` (from step ``t`` to ``t + 1``)
    by ``shape(u)``, ``u = (t - n) / window`` for ``t >= n = T - window`` (1 before; ``T`` the
    last checkpoint's step): ``"linear"`` ``1 - u``, ``"cosine"`` ``(1 + cos(pi u)) / 2``,
    ``"1-sqrt"`` ``1 - sqrt(u)`` (Hägele et al. 2024), or any non-increasing callable with
    values in ``[0, 1]``. Each gradient between two checkpoints gets the mean multiplier of its
    segment (exact with a checkpoint at every step of the window). See the module docstring
    for the derivation.

    Raises:
        ValueError: the window starts before the first checkpoint (one is needed at or before
            step ``T - window``), or a shape that increases (a negative weight).

    Examples:
        >>> w = wsm([800, 850, 900, 950, 1000], "linear", window=200)
        >>> [round(v, 4) for v in w], sum(w)
        ([0.1225, 0.25, 0.25, 0.25, 0.1275], 1.0)
    """
    s = _steps(steps)
    window = integer("window", window, 1)
    n = s[-1] - window
    if n < 0:
        raise ValueError(
            f"window={window} is longer than the run up to the last checkpoint (step {s[-1]}); "
            f"a window of at most {s[-1] - s[0]} fits the checkpoints given"
        )
    if n < s[0]:
        raise ValueError(
            f"window={window} starts at step {n}, before the first checkpoint (step {s[0]}): "
            f"give a checkpoint at or before step {n}, or a window of at most {s[-1] - s[0]}"
        )
    u = (np.arange(n, s[-1], dtype=np.float64) - n) / window
    decayed = _multipliers(shape, u)
    name = shape if isinstance(shape, str) else getattr(shape, "__name__", "callable")
    mult = np.concatenate([np.ones(n - s[0]), decayed])  # one per step from s[0]
    bounds = np.asarray(s) - s[0]
    means = np.add.reduceat(mult, bounds[:-1]) / np.diff(bounds)
    values = -np.diff(np.concatenate([[1.0], means, [0.0]]))
    if np.any(values < -1e-12):
        i = int(np.argmin(values))
        raise ValueError(
            f"shape {name!r} increases over the window: the checkpoint of step {s[i]} would "
            f"get the weight {values[i]:.3g}; a decay shape must not increase"
        )
    return _make(np.clip(values, 0.0, None), f"wsm({name}, window={window})", s, None)
