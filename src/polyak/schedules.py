"""Decay schedules: the optimizer step of an update -> the decay to apply.

An update is ``avg <- decay * avg + (1 - decay) * value``; ``decay`` is the weight kept on the old
average. Pure Python (``math`` only): no NumPy, no torch.

Conventions:
    * ``t`` is the 1-based count of optimizer steps since averaging started, at this update. The
      average is a copy of the weights at ``t = 0``.
    * ``dt`` (``1 <= dt <= t``) is the number of optimizer steps since the previous update.
    * ``schedule(t, dt)`` is the decay for the whole gap: the product of the per-step decays of
      steps ``t-dt+1 .. t``. It is exact for a value held constant over the gap, so the horizon does
      not depend on how often the average is updated (``update_every``, accumulation).
    * ``schedule.per_step(t)`` is the decay of the single step ``t`` (equal to ``schedule(t, 1)``).

Index conventions of other libraries, for ``min_decay = 0`` and ``update_after_step = 0``:
    * torch_ema ``ExponentialMovingAverage(use_num_updates=True)`` and TF
      ``ExponentialMovingAverage(num_updates=global_step)`` use ``n = t``: :func:`warmup`.
    * timm ``ModelEmaV3(use_warmup=True).get_decay(t)`` and diffusers
      ``EMAModel(use_ema_warmup=True).get_decay(t)`` use ``n = t - 1``: :func:`inverse_power`
      equals them for every ``t >= 1`` (no shift). They return 0 at ``t = 1`` even when
      ``min_decay > 0``; ours returns ``min_decay`` there.
    * diffusers ``EMAModel(use_ema_warmup=False).get_decay(t)`` is ``t / (9 + t)``, i.e. the TF rule
      shifted by one (``n = t - 1``), except 0 at ``t = 1``: it equals
      ``warmup(d, count_from=0).per_step(t)`` for ``t >= 2``.
    * Morales-Brotons et al. count EMA updates from 0 (see :func:`warmup`): ``count_from=0``.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from polyak._horizon import (
    SIGMA_REL_MAX,
    decay_to_halflife,
    decay_to_sigma_rel,
    gamma_to_sigma_rel,
    halflife_to_decay,
    integer,
    positive,
    real,
    real_in,
    scale_decay,
    sigma_rel_to_decay,
    sigma_rel_to_gamma,
)

__all__ = [
    "Schedule",
    "as_schedule",
    "constant",
    "cosine",
    "debiased",
    "decay_to_halflife",
    "decay_to_sigma_rel",
    "dino_momentum",
    "gamma_to_sigma_rel",
    "halflife",
    "halflife_to_decay",
    "inverse_power",
    "lr_weighted",
    "polynomial",
    "power",
    "scale_decay",
    "sigma_rel_to_decay",
    "sigma_rel_to_gamma",
    "uniform",
    "warmup",
    "weighted",
]


def _unit(name: str, value: object) -> float:
    return real_in(name, value, 0.0, 1.0)


class Schedule:
    """A map from the optimizer step of an update (and the gap ``dt``) to its decay.

    Built-in schedules come from the functions of this module. Subclasses set ``kind``, implement
    ``_step(t)`` (``t`` already validated) and may override ``_gap(t, dt)`` with a closed form; the
    default multiplies ``_step`` over the gap. ``_params()`` lists the constructor arguments,
    which make up ``repr`` and ``state_dict``; names in ``_mutable`` are restored on load.

    Examples:
        >>> s = constant(0.9)
        >>> s(5), round(s(5, dt=2), 12), s.per_step(5)
        (0.9, 0.81, 0.9)
    """

    kind: ClassVar[str] = "schedule"
    _mutable: ClassVar[tuple[str, ...]] = ()

    def per_step(self, t: int) -> float:
        """Decay of the single optimizer step ``t`` (1-based)."""
        return self._step(integer("t", t, 1))

    def __call__(self, t: int, dt: int = 1) -> float:
        """Decay for the ``dt`` optimizer steps ending at step ``t``: ``prod(per_step(j))``."""
        t = integer("t", t, 1)
        dt = integer("dt", dt, 1)
        if dt > t:
            raise ValueError(f"dt must be <= t, got t={t}, dt={dt}")
        return self._gap(t, dt)

    def _step(self, t: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement _step(t)")

    def _gap(self, t: int, dt: int) -> float:
        out = 1.0
        for j in range(t - dt + 1, t + 1):
            out *= self._step(j)
        return out

    def _params(self) -> dict[str, Any]:
        return {}

    @property
    def name(self) -> str:
        """Short readable name, a default name for the average (e.g. ``"0.999"``)."""
        return self.kind

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable description: ``{"kind": ..., **params}``."""
        return {"kind": self.kind, **self._params()}

    def stage_state(self, state: Mapping[str, Any]) -> Callable[[], None]:
        """Check ``state`` (a :meth:`state_dict`) and return the function that loads it.

        Nothing changes until that function is called, so a caller loading several schedules
        can check them all first. Loading restores the mutable fields and warns
        (``UserWarning``) where a saved fixed parameter differs from the current one.

        Raises:
            TypeError, ValueError: ``state`` is not a mapping, describes another kind of
                schedule, or holds an invalid value for a mutable field.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("kind") != self.kind:
            raise ValueError(
                f"cannot load a {state.get('kind')!r} schedule state into a {self.kind!r} schedule"
            )
        probe = copy.copy(self)
        for key in self._mutable:
            if key in state:
                setattr(probe, key, state[key])  # the setters validate
        values = {key: getattr(probe, key) for key in self._mutable}
        current = self._params()
        differ = [
            (key, saved, current.get(key))
            for key, saved in state.items()
            if key != "kind" and key not in self._mutable and current.get(key) != saved
        ]

        def commit() -> None:
            for key, value in values.items():
                setattr(self, key, value)
            for key, saved, now in differ:
                warnings.warn(
                    f"{self.name}: saved {key}={saved!r} differs from current {key}={now!r}; "
                    "keeping the current value",
                    UserWarning,
                    stacklevel=4,
                )

        return commit

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore mutable fields (all or nothing); see :meth:`stage_state`."""
        self.stage_state(state)()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items() if v is not None)
        return f"{self.kind}({args})"


class _Constant(Schedule):
    kind = "constant"

    def __init__(self, decay: float) -> None:
        self.decay = _unit("decay", decay)

    def _step(self, t: int) -> float:
        return self.decay

    def _gap(self, t: int, dt: int) -> float:
        return self.decay**dt

    def _params(self) -> dict[str, Any]:
        return {"decay": self.decay}

    @property
    def name(self) -> str:
        return repr(self.decay)


def constant(decay: float) -> Schedule:
    """Constant decay: per step ``decay``; over a gap of ``dt`` steps ``decay ** dt``.

    ``decay ** dt`` keeps the time constant when updating every ``dt`` steps (Morales-Brotons et
    al., TMLR 2024, App. F; Busbridge et al. 2023).

    Args:
        decay: the per-step decay in ``[0, 1]``; 0 copies, 1 freezes the average.

    Examples:
        >>> constant(0.999).name, constant(0.5)(10, dt=2)
        ('0.999', 0.25)
    """
    return _Constant(decay)


class _Warmup(Schedule):
    kind = "warmup"

    def __init__(self, decay: float, period: int, count_from: int) -> None:
        self.decay = _unit("decay", decay)
        self.period = integer("period", period, 1)
        self.count_from = integer("count_from", count_from, 0)

    def _cap(self, p: int) -> float:  # decay of the p-th period (0-based)
        n = p + self.count_from
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def _step(self, t: int) -> float:
        c = self._cap((t - 1) // self.period)
        return c if self.period == 1 else c ** (1.0 / self.period)

    def _gap(self, t: int, dt: int) -> float:
        out, j = 1.0, t - dt + 1
        while j <= t:  # one factor per (part of a) period in the gap
            p = (j - 1) // self.period
            last = min(t, (p + 1) * self.period)
            c = self._cap(p)
            out *= c if last - j + 1 == self.period else c ** ((last - j + 1) / self.period)
            j = last + 1
        return out

    def _params(self) -> dict[str, Any]:
        return {"decay": self.decay, "period": self.period, "count_from": self.count_from}

    @property
    def name(self) -> str:
        extra = "" if self.period == 1 else f", period={self.period}"
        extra += "" if self.count_from == 1 else f", count_from={self.count_from}"
        return f"warmup({self.decay!r}{extra})"


def warmup(decay: float, *, period: int = 1, count_from: int = 1) -> Schedule:
    """TF ``num_updates`` warm-up: decay ``min(decay, (1 + n) / (10 + n))`` for counter ``n``.

    With ``period = 1`` the counter is the step, ``n = t``: the rule of
    ``tf.train.ExponentialMovingAverage(decay, num_updates=global_step)`` and of torch_ema
    ``ExponentialMovingAverage(use_num_updates=True)`` (which increments ``num_updates`` before
    using it). It reaches 0.999 at ``n ~ 8990``. With ``period > 1``, ``decay`` is the decay per
    ``period`` steps and the counter counts periods: step ``j`` has decay
    ``min(decay, (1 + s) / (10 + s)) ** (1 / period)`` with
    ``s = ceil(j / period) - 1 + count_from``, so an update every ``period`` steps
    (``dt = period``) applies exactly ``min(decay, (1 + s) / (10 + s))``.

    Morales-Brotons et al. (TMLR 2024) update every 16 steps and count EMA updates from 0: in
    ``Morales97/decentralized-DL``, ``optimizer/optimizer.py`` (commit 497b9ac), ``OptimizerEMA``
    sets ``self.step = 0`` (line 52), computes ``min(alpha, (step + 1)/(step + 10))`` (line 58) and
    only then increments (line 61), so its first update decays by 0.1, not 2/11. Their protocol is
    ``warmup(alpha, period=16, count_from=0)``. (Their loop, ``train_cifar.py``, updates when
    ``step % ema_period == 0`` for a 0-based step: after optimizer steps 1, 17, 33, ...; ours after
    16, 32, ...; the decays of the k-th update agree.)

    Args:
        decay: the cap, per ``period`` steps, in ``[0, 1]``.
        period: optimizer steps per counter increment (the EMA update period), ``>= 1``.
        count_from: the counter of the first period: 1 (TF, torch_ema) or 0 (Morales-Brotons).

    Examples:
        >>> w = warmup(0.999)
        >>> round(w(1), 12), round(w(8990), 6), w(10**6)
        (0.181818181818, 0.999, 0.999)
        >>> round(warmup(0.998, period=16, count_from=0)(16, dt=16), 12)
        0.1
    """
    return _Warmup(decay, period, count_from)


class _InversePower(Schedule):
    kind = "inverse_power"

    def __init__(self, decay: float, inv_gamma: float, power: float, min_decay: float) -> None:
        self.decay = _unit("decay", decay)
        self.inv_gamma = positive("inv_gamma", inv_gamma)
        self.power = positive("power", power)
        self.min_decay = real_in("min_decay", min_decay, 0.0, self.decay)

    def _step(self, t: int) -> float:
        value = 1.0 - (1.0 + (t - 1) / self.inv_gamma) ** -self.power
        return min(self.decay, max(self.min_decay, value))

    def _params(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "min_decay": self.min_decay,
        }

    @property
    def name(self) -> str:
        extra = "" if self.inv_gamma == 1.0 else f", inv_gamma={self.inv_gamma:g}"
        extra += "" if self.min_decay == 0.0 else f", min_decay={self.min_decay:g}"
        return f"inverse_power({self.decay!r}, power={self.power:.4g}{extra})"


def inverse_power(
    decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0
) -> Schedule:
    """@crowsonkb's warm-up: per step ``clamp(1 - (1 + n/inv_gamma) ** -power, min_decay, decay)``.

    ``n = t - 1``, so step 1 gives ``min_decay`` (a copy when 0). Equal to timm
    ``ModelEmaV3(use_warmup=True).get_decay(t)`` and diffusers
    ``EMAModel(use_ema_warmup=True).get_decay(t)`` (``update_after_step=0``, ``min_decay=0``);
    with ``min_decay > 0`` they return 0 at ``t = 1``, where ours returns ``min_decay``.
    ``power=2/3`` reaches 0.999 at ~31.6K steps and 0.9999 at ~1M; ``power=3/4`` reaches 0.999 at
    ~10K and 0.9999 at ~215.4K (crowsonkb, quoted in timm and diffusers).

    Args:
        decay: the cap in ``[0, 1]``.
        inv_gamma: ``> 0``, stretches the step count.
        power: ``> 0``; the window grows like ``t ** power``.
        min_decay: the floor, in ``[0, decay]``.

    Examples:
        >>> s = inverse_power()
        >>> s(1), round(s(2), 6), round(s(31_623), 6)
        (0.0, 0.370039, 0.999)
    """
    return _InversePower(decay, inv_gamma, power, min_decay)


class _Power(Schedule):
    kind = "power"

    def __init__(self, sigma_rel: float | None, gamma: float | None) -> None:
        if (sigma_rel is None) == (gamma is None):
            raise ValueError(
                f"give exactly one of sigma_rel and gamma, got sigma_rel={sigma_rel!r}, "
                f"gamma={gamma!r}"
            )
        self._given: dict[str, float | None] = {"sigma_rel": None, "gamma": None}
        if sigma_rel is not None:
            rel = real_in("sigma_rel", sigma_rel, 0.0, SIGMA_REL_MAX, lo_open=True, hi_open=True)
            self._given["sigma_rel"] = rel
            self.gamma = sigma_rel_to_gamma(rel)
        else:
            self._given["gamma"] = self.gamma = real("gamma", gamma)
            if self.gamma < 0.0:
                raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.sigma_rel = gamma_to_sigma_rel(self.gamma)
        self._exponent = self.gamma + 1.0

    def _step(self, t: int) -> float:
        return ((t - 1) / t) ** self._exponent

    def _gap(self, t: int, dt: int) -> float:
        return ((t - dt) / t) ** self._exponent

    def _params(self) -> dict[str, Any]:
        return dict(self._given)

    @property
    def name(self) -> str:
        return repr(self)


def power(sigma_rel: float | None = None, gamma: float | None = None) -> Schedule:
    """EDM2 power-function average: over a gap ``(1 - dt/t) ** (gamma + 1)``.

    Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (CVPR 2024),
    Eq. 1-2 / 121, 127: the average weighs step ``tau`` by ``tau ** gamma`` on ``[0, t]``; the
    initial weights get no weight (the first update copies). Give exactly one of ``sigma_rel``
    (Eq. 122-126, converted with :func:`sigma_rel_to_gamma`) and ``gamma``.

    Args:
        sigma_rel: relative width in ``(0, 12**-0.5)``; EDM2 tracks 0.05 and 0.10.
        gamma: exponent ``>= 0`` (0 is :func:`uniform`).

    Examples:
        >>> power(gamma=1.0)(4, dt=2)
        0.25
        >>> power(sigma_rel=0.05).name
        'power(sigma_rel=0.05)'
    """
    return _Power(sigma_rel, gamma)


class _Uniform(_Power):
    kind = "uniform"

    def __init__(self) -> None:
        super().__init__(None, 0.0)

    def _params(self) -> dict[str, Any]:
        return {}

    @property
    def name(self) -> str:
        return "uniform"


def uniform() -> Schedule:
    """Running arithmetic mean (Polyak-Ruppert; SWA, Izmailov et al. 2018): ``1 - dt/t``.

    :func:`power` with ``gamma = 0``: every optimizer step weighs the same, a value held over a gap
    of ``dt`` steps counts ``dt`` times, and the initial copy gets no weight.

    Examples:
        >>> [uniform()(t) for t in (1, 2, 4)]
        [0.0, 0.5, 0.75]
    """
    return _Uniform()


class _Halflife(Schedule):
    kind = "halflife"
    _mutable = ("batch_size", "steps_per_epoch")
    _batch_size: float | None
    _steps_per_epoch: float | None

    def __init__(
        self,
        steps: float | None,
        samples: float | None,
        epochs: float | None,
        batch_size: float | None,
        steps_per_epoch: float | None,
    ) -> None:
        given = {"steps": steps, "samples": samples, "epochs": epochs}
        if sum(v is not None for v in given.values()) != 1:
            raise ValueError(f"give exactly one of steps, samples and epochs, got {given}")
        self.mode = next(k for k, v in given.items() if v is not None)
        self.value = positive(self.mode, given[self.mode])
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch

    def _set(self, field: str, value: float | None, needed_by: str) -> None:
        if value is None and self.mode == needed_by:
            raise ValueError(f"{field} is required with {needed_by}=..., got None")
        setattr(self, "_" + field, None if value is None else positive(field, value))

    @property
    def batch_size(self) -> float | None:
        """Samples per optimizer step; may change mid-run (samples mode keeps its horizon)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: float | None) -> None:
        self._set("batch_size", value, "samples")

    @property
    def steps_per_epoch(self) -> float | None:
        """Optimizer steps per epoch; may change mid-run (epochs mode keeps its horizon)."""
        return self._steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: float | None) -> None:
        self._set("steps_per_epoch", value, "epochs")

    @property
    def halflife_steps(self) -> float:
        """The current half-life in optimizer steps."""
        if self.mode == "samples":
            assert self._batch_size is not None  # enforced by the setter
            return self.value / self._batch_size
        if self.mode == "epochs":
            assert self._steps_per_epoch is not None
            return self.value * self._steps_per_epoch
        return self.value

    def _step(self, t: int) -> float:
        return 0.5 ** (1.0 / self.halflife_steps)

    def _gap(self, t: int, dt: int) -> float:
        return 0.5 ** (dt / self.halflife_steps)

    def _params(self) -> dict[str, Any]:
        return {
            "steps": None,
            "samples": None,
            "epochs": None,
            self.mode: self.value,
            "batch_size": self._batch_size,
            "steps_per_epoch": self._steps_per_epoch,
        }

    @property
    def name(self) -> str:
        return f"halflife({self.mode}={self.value:g})"


def halflife(
    steps: float | None = None,
    *,
    samples: float | None = None,
    epochs: float | None = None,
    batch_size: float | None = None,
    steps_per_epoch: float | None = None,
) -> Schedule:
    """Constant horizon given as a half-life: per step ``0.5 ** (1 / h)``, ``h`` in steps.

    Give exactly one of ``steps``, ``samples`` (``h = samples / batch_size``; the EDM/EDM2 "ema
    half-life in images") and ``epochs`` (``h = epochs * steps_per_epoch``). ``batch_size`` and
    ``steps_per_epoch`` are mutable attributes saved in ``state_dict``: after changing
    ``batch_size`` by a factor ``kappa`` the per-step decay becomes ``decay ** kappa``, the EMA
    scaling rule of Busbridge et al. ("How to Scale Your EMA", NeurIPS 2023), which keeps the
    horizon in samples.

    Args:
        steps: half-life in optimizer steps, ``> 0``.
        samples: half-life in training samples, ``> 0``; needs ``batch_size``.
        epochs: half-life in epochs, ``> 0``; needs ``steps_per_epoch``.
        batch_size: samples per optimizer step, ``> 0``.
        steps_per_epoch: optimizer steps per epoch, ``> 0``.

    Examples:
        >>> h = halflife(samples=10_000, batch_size=100)
        >>> h.name, h(100, dt=100)
        ('halflife(samples=10000)', 0.5)
        >>> h.batch_size = 200
        >>> h(100, dt=50)
        0.5
    """
    return _Halflife(steps, samples, epochs, batch_size, steps_per_epoch)


class _Cosine(Schedule):
    kind = "cosine"

    def __init__(self, start: float, end: float, total_steps: int) -> None:
        self.start = _unit("start", start)
        self.end = _unit("end", end)
        self.total_steps = integer("total_steps", total_steps, 1)

    def _step(self, t: int) -> float:
        k = min(t - 1, self.total_steps)
        ramp = (math.cos(math.pi * k / self.total_steps) + 1.0) / 2.0
        return self.end - (self.end - self.start) * ramp

    def _gap(self, t: int, dt: int) -> float:
        flat = max(0, t - max(t - dt, self.total_steps))  # steps past the ramp decay by `end`
        return self.end**flat * super()._gap(t - flat, dt - flat)

    def _params(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "total_steps": self.total_steps}

    @property
    def name(self) -> str:
        return f"cosine({self.start!r}, {self.end!r}, total_steps={self.total_steps})"


def cosine(start: float = 0.996, end: float = 1.0, *, total_steps: int) -> Schedule:
    """BYOL / MoCo momentum ramp: ``end - (end - start) * (cos(pi * k / K) + 1) / 2``.

    ``k = min(t - 1, K)`` with ``K = total_steps``: step 1 decays by ``start`` and steps after
    ``K`` by ``end`` (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, Sec. 3.2, with
    ``k`` the 0-based step).

    Args:
        start: decay of the first step, in ``[0, 1]``.
        end: decay from step ``K + 1`` on, in ``[0, 1]``.
        total_steps: ``K >= 1``, the length of the ramp in optimizer steps.

    Examples:
        >>> c = cosine(0.99, 1.0, total_steps=100)
        >>> c(1), round(c(51), 12), c(101)
        (0.99, 0.995, 1.0)
    """
    return _Cosine(start, end, total_steps)


def dino_momentum(total_steps: int, *, start: float = 0.996, end: float = 1.0) -> Schedule:
    """DINO's teacher momentum: a cosine ramp from ``start`` (0.996) to ``end`` (1) over training.

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021), update
    the teacher after iteration ``i`` (0-based, ``i = t - 1``) with momentum
    ``m_i = end + (start - end) * (1 + cos(pi * i / T)) / 2`` for ``T`` = epochs x iterations per
    epoch (their ``cosine_scheduler``). That is :func:`cosine` over ``total_steps = T``, which this
    returns; steps after ``T`` keep ``end``.

    Examples:
        >>> d = dino_momentum(100)
        >>> d(1), round(d(51), 12), d(200)
        (0.996, 0.998, 1.0)
    """
    return cosine(start, end, total_steps=total_steps)


class _Debiased(Schedule):
    kind = "debiased"

    def __init__(self, decay: float) -> None:
        self.decay = real_in("decay", decay, 0.0, 1.0, hi_open=True)

    def _gap(self, t: int, dt: int) -> float:
        if self.decay == 0.0:
            return 0.0
        log_d = math.log(self.decay)  # expm1 keeps 1 - decay**n accurate for decay near 1
        return self.decay**dt * math.expm1((t - dt) * log_d) / math.expm1(t * log_d)

    def _step(self, t: int) -> float:
        return self._gap(t, 1)

    def _params(self) -> dict[str, Any]:
        return {"decay": self.decay}

    @property
    def name(self) -> str:
        return f"debiased({self.decay!r})"


def debiased(decay: float) -> Schedule:
    """Exact zero-debiasing for a copy-initialised average: ``d (1 - d**(t-1)) / (1 - d**t)``.

    With this decay the copy-initialised average equals Adam's bias-corrected EMA
    ``m_t / (1 - d**t)`` of the values of steps ``1..t`` (``m_0 = 0``; Kingma & Ba 2015, TF
    ``zero_debias``, optax ``ema(debias=True)``): the initial weights keep no weight. Over a gap,
    ``d**dt (1 - d**(t-dt)) / (1 - d**t)``; step 1 gives 0 (a copy) and the decay tends to ``d``.

    Args:
        decay: the underlying constant decay, in ``[0, 1)``.

    Examples:
        >>> s = debiased(0.9)
        >>> s(1), round(s(2), 12), round(s(3, dt=2), 6)
        (0.0, 0.473684210526, 0.298893)
    """
    return _Debiased(decay)


class _Callable(Schedule):
    kind = "callable"

    def __init__(self, fn: Callable[[int, int], float]) -> None:
        self.fn = fn

    def _gap(self, t: int, dt: int) -> float:
        value = self.fn(t, dt)
        return real_in(f"{self.name}({t}, {dt})", value, 0.0, 1.0)

    def _step(self, t: int) -> float:
        return self._gap(t, 1)

    def _params(self) -> dict[str, Any]:
        return {"name": self.name}

    @property
    def name(self) -> str:
        return str(getattr(self.fn, "__name__", type(self.fn).__name__))

    def __repr__(self) -> str:
        return f"as_schedule({self.fn!r})"


def as_schedule(decay: float | Schedule | Callable[[int, int], float]) -> Schedule:
    """Turn what users pass as ``decay`` into a :class:`Schedule`.

    A number in ``[0, 1]`` becomes :func:`constant`; a :class:`Schedule` is returned as is; any
    other callable ``(t, dt) -> decay`` is wrapped (its ``__name__`` is the name, its result is
    checked to lie in ``[0, 1]``, and its ``state_dict`` kind is ``"callable"``). The callable
    must itself return the decay for the whole gap of ``dt`` steps.

    Raises:
        TypeError: ``decay`` is a bool or neither a number nor a callable.
        ValueError: a number outside ``[0, 1]``.

    Examples:
        >>> as_schedule(0.99).name
        '0.99'
        >>> def slow(t, dt):
        ...     return 0.5**dt
        >>> as_schedule(slow).name, as_schedule(slow)(3, dt=2)
        ('slow', 0.25)
    """
    if isinstance(decay, Schedule):
        return decay
    if isinstance(decay, bool):
        raise TypeError(f"decay must be a number, a Schedule or a callable, got bool {decay!r}")
    if isinstance(decay, numbers.Real):
        return constant(float(decay))
    if callable(decay):
        return _Callable(decay)
    raise TypeError(
        f"decay must be a number, a Schedule or a callable (t, dt) -> float, "
        f"got {type(decay).__name__}"
    )


# Weighted averages live in their own module (one idea each) and are part of this namespace.
from polyak._weighted import lr_weighted, polynomial, weighted  # noqa: E402
