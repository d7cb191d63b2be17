"""Kinds of average beyond a decay schedule, chosen through ``decay=`` like any schedule.

:func:`bema` is the bias-corrected EMA of Block & Zhang (2025): an EMA whose decay is a schedule,
plus a read-time correction ``alpha_t (theta - theta_0)`` from an anchor ``theta_0``. It sits
beside plain decays in one :class:`polyak.EMA` (``EMA(model, {"ema": 0.999, "bema": bema()})``)
and in :mod:`polyak.jax`. Pure core: Python ``math`` only; the EMA keeps the anchor and applies
the correction.
"""

from __future__ import annotations

from typing import Any

from polyak._horizon import integer, real
from polyak.schedules import Schedule

__all__ = ["BEMA", "bema"]


class BEMA(Schedule):
    """The schedule of a BEMA average: the EMA part's decay, the anchor's step and ``alpha_t``.

    Built by :func:`bema`; see there for the equations. ``t`` is the step count the schedule
    sees (optimizer steps since ``start_step`` or the last restart).
    """

    kind = "bema"

    def __init__(
        self,
        ema_power: float,
        bias_power: float,
        lag: float,
        multiplier: float,
        min_ema_multiplier: float,
        anchor_step: int,
        per_update: bool,
    ) -> None:
        self.ema_power = real("ema_power", ema_power)
        self.bias_power = real("bias_power", bias_power)
        self.lag = real("lag", lag)
        self.multiplier = real("multiplier", multiplier)
        self.min_ema_multiplier = real("min_ema_multiplier", min_ema_multiplier)
        for field in ("ema_power", "bias_power", "multiplier"):
            if getattr(self, field) < 0.0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)!r}")
        if self.lag <= 0.0:
            raise ValueError(f"lag (rho) must be > 0, got {lag!r}")
        if not 0.0 <= self.min_ema_multiplier <= 1.0:
            raise ValueError(f"min_ema_multiplier must be in [0, 1], got {min_ema_multiplier!r}")
        self.anchor_step = integer("anchor_step", anchor_step, 0)
        if not isinstance(per_update, bool):
            raise TypeError(f"per_update must be True or False, got {per_update!r}")
        self.per_update = per_update

    def beta(self, t: int) -> float:
        """The EMA part's update weight at step ``t``: ``clamp((lag + multiplier t)^-ema_power,
        min_ema_multiplier, 1)``."""
        value = (self.lag + self.multiplier * t) ** -self.ema_power
        return min(1.0, max(self.min_ema_multiplier, value))

    def alpha(self, t: int) -> float:
        """The correction weight at step ``t``: ``(lag + multiplier t)^-bias_power``."""
        return float((self.lag + self.multiplier * t) ** -self.bias_power)

    def anchor_due(self, t: int, dt: int) -> bool:
        """The update covering steps ``t-dt+1 .. t`` takes the anchor (it reaches
        ``anchor_step``); the EMA part copies the weights at that update too."""
        return t - dt < self.anchor_step

    def _step(self, t: int) -> float:
        return 0.0 if t <= self.anchor_step else 1.0 - self.beta(t)

    def _gap(self, t: int, dt: int) -> float:
        if self.anchor_due(t, dt):
            return 0.0
        if self.per_update:
            return 1.0 - self.beta(t)
        return super()._gap(t, dt)

    def _params(self) -> dict[str, Any]:
        return {
            "ema_power": self.ema_power,
            "bias_power": self.bias_power,
            "lag": self.lag,
            "multiplier": self.multiplier,
            "min_ema_multiplier": self.min_ema_multiplier,
            "anchor_step": self.anchor_step,
            "per_update": self.per_update,
        }

    @property
    def name(self) -> str:
        return f"bema(ema_power={self.ema_power:g}, bias_power={self.bias_power:g})"


def bema(
    ema_power: float = 0.5,
    bias_power: float = 0.2,
    *,
    lag: float = 10.0,
    multiplier: float = 1.0,
    min_ema_multiplier: float = 0.0,
    anchor_step: int = 0,
    per_update: bool = False,
) -> BEMA:
    """BEMA, the bias-corrected EMA: an EMA with a warm-up decay, read with its lag removed.

    With ``rho = lag``, ``gamma = multiplier``, ``kappa = ema_power``, ``eta = bias_power`` and
    ``t`` the optimizer steps counted by the EMA (its ``step``, less ``start_step``):

        beta_t  = clamp((rho + gamma t)^-kappa, min_ema_multiplier, 1)   (update weight)
        EMA_t   = (1 - beta_t) EMA_{t-1} + beta_t theta_t                (stored; decay 1 - beta_t)
        alpha_t = (rho + gamma t)^-eta
        BEMA_t  = EMA_t + alpha_t (theta_t - theta_0)                    (what reads give)

    ``theta_0``, the anchor, is one extra copy of the tracked tensors, taken from the live weights
    at the update that reaches ``anchor_step`` (the update at ``anchor_step`` itself when it is a
    multiple of ``update_every``; with the default 0, the weights the EMA starts from). Until
    then the EMA part copies the weights; after it the EMA part starts from the anchor. Block &
    Zhang, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes" (2025). A large
    ``bias_power`` (``alpha_t -> 0``) gives back the plain warm-up EMA; ``bias_power=0`` the
    full correction ``alpha_t = 1``.

    The correction is paid when the average is read, not at each update: an update costs what
    a plain EMA's costs (the anchor is only written at the update that takes it). Every read of
    a :class:`polyak.EMA` gives ``BEMA_t`` (``swapped``, ``copy_to``, ``get_module``,
    ``averaged_state_dict``, the Lightning and Hugging Face callbacks' evaluation and exports),
    computed from the live weights at the time of the read and ``alpha`` of the last update:
    at an update step (``update_every=1``, or a read right after an update) that is exactly the
    paper's ``BEMA_t``; between updates it uses the newer live weights. ``averaged_tensors()``
    and ``state_dict()`` give the stored EMA part (and the state dict the anchor), which is what
    resuming needs and what a read-time correction cannot be stored as.

    ``update_every=k``: by default the EMA part's decay over a gap is the product of the
    per-step decays (the design's rule 2: the horizon in optimizer steps does not depend on
    ``k``). TRL's ``BEMACallback`` and the paper's code, with ``update_freq = phi``, apply
    ``beta_t`` once per update instead, an EMA of the sub-sampled iterates whose horizon grows
    with ``phi``: pass ``per_update=True`` (with ``update_every=phi``) to get theirs.

    Names in TRL's ``BEMACallback`` (``trl/trainer/callbacks.py``, trl 1.16) and the paper:

    ============================  =====================  =========
    here                          TRL                    paper
    ============================  =====================  =========
    ``ema_power=0.5``             ``ema_power=0.5``      kappa
    ``bias_power=0.2``            ``bias_power=0.2``     eta
    ``lag=10``                    ``lag=10``             rho
    ``multiplier=1``              ``multiplier=1.0``     gamma
    ``min_ema_multiplier=0``      ``min_ema_multiplier``
    ``anchor_step=0``             ``update_after=0``     tau
    ``EMA(update_every=400)``     ``update_freq=400``    phi
    ``per_update=True``           (its behaviour)
    ============================  =====================  =========

    Args:
        ema_power: ``kappa >= 0``; the EMA part's window grows like ``t ** kappa``.
        bias_power: ``eta >= 0``; how fast the correction fades.
        lag: ``rho > 0``, a virtual starting age.
        multiplier: ``gamma >= 0``, steps per unit of age.
        min_ema_multiplier: floor of ``beta_t``, in ``[0, 1]``.
        anchor_step: ``tau >= 0``, the step (counted as ``t``) at which the anchor is taken.
        per_update: apply ``beta_t`` once per update whatever the gap (TRL's ``update_freq``).

    Returns:
        a :class:`BEMA` schedule: pass it as a ``decay`` (alone, in a list or in a dict).

    Examples:
        >>> import torch, polyak
        >>> from polyak.averages import bema
        >>> model = torch.nn.Linear(3, 1)
        >>> ema = polyak.EMA(model, {"ema": 0.999, "bema": bema()})
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> ema.update()
        >>> fixed = ema.averaged_state_dict("bema")["weight"]   # EMA + alpha (live - anchor)
        >>> stored = ema.averaged_tensors("bema")["weight"]     # the EMA part, lagging
        >>> bool(((model.weight - fixed).abs() < (model.weight - stored).abs()).all())
        True
    """
    return BEMA(ema_power, bias_power, lag, multiplier, min_ema_multiplier, anchor_step, per_update)
