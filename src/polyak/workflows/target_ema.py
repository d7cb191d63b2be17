"""An exponential moving average that lives in a second model: :class:`TargetEMA`.

A teacher (DINO, mean teacher), a momentum encoder (BYOL, MoCo), an RL target network or a
reference policy synchronised with the trained one (TR-DPO) is an EMA of the online weights that
must *be a model*: it runs forward passes of its own, sharded like the online model. An
:class:`polyak.EMA` keeps its averages in flat buffers beside the model; here the target model's
own weights are the average, updated with :func:`~polyak.workflows.soft_update_` (shard by shard
under FSDP2 and ZeRO-3, no communication) on the step accounting every polyak average shares
(schedules, ``update_every`` over the whole gap, ``start_step``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from polyak._state import check_header
from polyak._timeline import Timeline, TimelineState
from polyak.types import BufferPolicy, OneDecay
from polyak.workflows.target import _pairs, soft_update_

__all__ = ["TargetEMA"]

_FORMAT, _VERSION = "polyak.TargetEMA", 1


class TargetEMA:
    """Keep ``target`` an exponential moving average of ``online``, in place.

    Each :meth:`update` (after an optimizer step of ``online``) applies, to every floating
    parameter (and floating buffer, with ``buffers="average"``) of the target,

        target <- decay_t * target + (1 - decay_t) * online

    with ``decay_t`` from ``decay`` (a float or a :mod:`polyak.schedules` schedule, e.g.
    ``cosine(0.996, 1.0, total)`` as in BYOL and DINO) over the optimizer steps since the last
    update: every ``update_every`` steps it applies the whole gap (``decay**k``), so the horizon
    does not depend on the cadence; updates at steps ``<= start_step`` copy ``online``. Integer
    buffers are copied. Tensors are matched by canonical name and checked (names, shapes,
    shardings) at construction and at every update, before anything changes.

    Sharded pairs (both FSDP2, or both DeepSpeed ZeRO-3, sharded the same way) are updated shard
    by shard on each rank, with no communication; every rank calls :meth:`update`.

    TR-DPO's reference synchronisation ``ref <- alpha * policy + (1 - alpha) * ref`` every
    ``tau`` steps is ``TargetEMA(ref, policy, decay=(1 - alpha) ** (1 / tau), update_every=tau)``
    (one update of ``decay**tau = 1 - alpha`` every ``tau`` steps).

    Resuming: :meth:`state_dict` holds the step counters and the schedule's state (plain Python
    data, no tensors). The target's weights are a model's: save them with it (its
    ``state_dict()``, or a DeepSpeed engine's ``save_checkpoint``).

    Args:
        target: the model holding the average (teacher, target network), updated in place.
        online: the trained model (possibly wrapped: DDP, DeepSpeed engine, ``torch.compile``).
        decay: one decay: a float or a schedule from :mod:`polyak.schedules`.
        update_every: update every this many optimizer steps (the gap's whole decay applied).
        start_step: updates at optimizer steps ``<= start_step`` copy the online weights.
        buffers: floating buffers are ``"average"``-d (default), ``"copy"``-ed or
            ``"ignore"``-d.

    Examples:
        >>> import copy, torch, polyak
        >>> from polyak.workflows import TargetEMA
        >>> online = torch.nn.Linear(4, 2)
        >>> teacher = TargetEMA(copy.deepcopy(online), online, decay=0.996)
        >>> teacher.update()                       # after each optimizer step of `online`
        >>> teacher.step
        1

    References:
        Grill et al., "Bootstrap Your Own Latent" (BYOL), NeurIPS 2020; Caron et al., "Emerging
        Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021; Gorbatovski et
        al., "Learn Your Reference Model for Real Good Alignment" (TR-DPO), 2024.
    """

    def __init__(
        self,
        target: nn.Module,
        online: nn.Module,
        decay: OneDecay = 0.996,
        *,
        update_every: int = 1,
        start_step: int = 0,
        buffers: BufferPolicy = "average",
    ) -> None:
        timeline = Timeline(decay, update_every=update_every, start_step=start_step)
        if len(timeline.names) != 1:
            raise TypeError(
                f"TargetEMA keeps one average (the target model), got decay={decay!r:.80}; "
                "make one TargetEMA per target model"
            )
        _pairs(target, online, buffers)  # names, shapes, shardings, buffers: checked now
        self._timeline = timeline
        self._target, self._online, self._buffers = target, online, buffers

    @property
    def target(self) -> nn.Module:
        """The model holding the average."""
        return self._target

    @property
    def online(self) -> nn.Module:
        """The trained model it follows."""
        return self._online

    @property
    def step(self) -> int:
        """Optimizer steps counted so far."""
        return self._timeline.step

    @property
    def timeline(self) -> TimelineState:
        """Every counter at once (steps, updates, the last decay; :class:`TimelineState`)."""
        t = self._timeline
        return TimelineState(
            t.step, t.num_updates, t.last_update_step, t.start_step, t.update_every,
            t.last_decay_by_name,
        )  # fmt: skip

    def update(self, *, steps: int = 1) -> None:
        """Account for ``steps`` optimizer steps of ``online`` and, when due, move the target.

        All or nothing: a check that fails (the models changed) raises before any weight or
        counter changes.
        """
        plan = self._timeline.plan(steps)
        if plan.decays:
            soft_update_(self._target, self._online, decay=plan.decays[0], buffers=self._buffers)
        self._timeline.commit(plan)

    def state_dict(self) -> dict[str, Any]:
        """The step counters and the schedule's state (plain Python data)."""
        return {"format": _FORMAT, "version": _VERSION, "timeline": self._timeline.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output; every field is checked before anything changes.

        Raises:
            TypeError, ValueError: naming the field at fault.
        """
        state = check_header(state, _FORMAT, _VERSION, ("timeline",))
        self._timeline.stage_state(state["timeline"])()

    def __repr__(self) -> str:
        return f"TargetEMA(decay={self._timeline.names[0]}, step={self.step})"
