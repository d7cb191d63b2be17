"""Step accounting shared by every stateful average (pure core: no NumPy, no torch).

A :class:`Timeline` turns "``k`` more optimizer steps happened" into "update now with these
decays" for one or several averages. It implements, once, the rules that make a horizon mean
what it says:

* ``update_every=k``: the averages change every ``k`` optimizer steps and each change applies the
  schedule over the whole gap (``decay**k`` for a constant decay, ``(1 - k/t)**(gamma+1)`` for a
  power schedule), so the horizon in optimizer steps does not depend on ``k``
  (Morales-Brotons et al. 2024, App. F; Karras et al. 2024, EDM2 Eq. 2).
* ``start_step=s``: an update at optimizer step ``t <= s`` copies the live weights; afterwards
  the schedule sees ``t - s`` steps, so a uniform or power average starting at ``s`` weighs only
  weights seen after ``s``.
* :meth:`Timeline.restart` (a PMA-style write-back) moves that origin to the current step: the
  schedules count again from there, as if the averages were started now.
* Anchored averages (:class:`polyak.averages.BEMA`) keep one more row, the anchor; a plan says
  for each whether this update takes it (decay 0: copy the live weights) or keeps it (1).

Planning and committing are separate so that a caller can run its kernels between the two and
leave every counter untouched when a kernel raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from warnings import warn

from polyak._deprecation import deprecated
from polyak._names import check_names
from polyak.averages import BEMA
from polyak.schedules import Schedule, as_schedule
from polyak.types import DecayLike, OneDecay

__all__ = ["Plan", "Timeline", "TimelineState", "TimelineViews", "parse_decays", "row_of"]


def parse_decays(decay: object) -> tuple[tuple[str, ...], tuple[Schedule, ...]]:
    """Names and schedules from ``decay``: a float, a schedule, or a sequence / dict of them.

    A dict gives the names; otherwise each average is named after its schedule (``"0.999"``,
    ``"power(sigma_rel=0.05)"``, ...). Two averages with the same name are an error.
    """
    if isinstance(decay, Mapping):
        if not decay:
            raise ValueError("decay: the dict of averages is empty")
        names = tuple(decay)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise TypeError(f"decay: average names must be non-empty strings, got {bad!r}")
        return names, tuple(as_schedule(cast(OneDecay, decay[n])) for n in names)
    if isinstance(decay, Sequence) and not isinstance(decay, (str, bytes)):
        if not decay:
            raise ValueError("decay: the sequence of averages is empty")
        schedules = tuple(as_schedule(cast(OneDecay, d)) for d in decay)
        names = tuple(s.name for s in schedules)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"decay: several averages would be named {dupes}; pass a dict to name them"
            )
        return names, schedules
    schedule = as_schedule(cast(OneDecay, decay))
    return (schedule.name,), (schedule,)


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an int, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Plan:
    """What :meth:`Timeline.plan` decided: the new step, and ``decays`` to apply (one per
    average), empty when no update is due at this step; ``anchors``: for each anchored average
    (:attr:`Timeline.anchored`), 0.0 when this update takes its anchor, else 1.0."""

    step: int
    decays: tuple[float, ...]
    anchors: tuple[float, ...] = ()


class Timeline:
    """Step counter, update cadence and schedules of one or several averages.

    Args:
        decay: a float, a schedule, or a sequence / dict of them (one per average).
        update_every: change the averages every this many optimizer steps.
        start_step: updates at optimizer steps ``<= start_step`` copy the live weights.
    """

    def __init__(self, decay: DecayLike, *, update_every: int = 1, start_step: int = 0) -> None:
        self.names, self.schedules = parse_decays(decay)
        self.update_every = _check_int(update_every, "update_every", 1)
        self.start_step = _check_int(start_step, "start_step", 0)
        self.step = 0
        self.last_update_step = 0
        self.num_updates = 0
        self.last_decays: tuple[float, ...] | None = None
        self.origin = 0  # the step of the last restart(): schedules count from max(start, origin)
        #: rows of the anchored averages (BEMA), in order; their anchors follow the K averages
        self.anchored = tuple(i for i, s in enumerate(self.schedules) if isinstance(s, BEMA))
        frozen = [
            n for n, s in zip(self.names, self.schedules) if s.kind == "constant" and s(1) == 1
        ]
        if frozen:
            warn(
                f"decay 1.0 (averages {frozen}): such an average never moves from the live "
                "weights it starts from (avg <- 1.0*avg + 0.0*live); pass a decay below 1, e.g. "
                "0.999",
                UserWarning,
                stacklevel=3,
            )

    def plan(self, steps: int = 1) -> Plan:
        """The decays to apply after ``steps`` more optimizer steps (none when not due).

        Changes nothing; call :meth:`commit` once the plan has been carried out.
        """
        steps = _check_int(steps, "steps", 1)
        t = self.step + steps
        if t - self.last_update_step < self.update_every:
            return Plan(t, ())
        start = self.start
        if t <= start:
            return Plan(t, tuple(0.0 for _ in self.schedules), tuple(0.0 for _ in self.anchored))
        t_rel = t - start
        dt = min(t - self.last_update_step, t_rel)
        decays = []
        for name, schedule in zip(self.names, self.schedules):
            d = schedule(t_rel, dt)
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
                raise ValueError(
                    f"schedule {schedule!r} of average {name!r} returned {d!r} at step {t_rel} "
                    f"(gap {dt}); a decay must be a float in [0, 1]"
                )
            decays.append(float(d))
        anchors = tuple(
            0.0 if cast(BEMA, self.schedules[i]).anchor_due(t_rel, dt) else 1.0
            for i in self.anchored
        )
        return Plan(t, tuple(decays), anchors)

    @property
    def start(self) -> int:
        """The step the schedules count from: ``start_step``, or the last restart if later."""
        return max(self.start_step, self.origin)

    def restart(self) -> None:
        """Count the schedules from the current step, as if the averages started now."""
        self.origin = self.step

    def alpha(self, row: int) -> float:
        """The correction weight of anchored average ``row`` at its last update (``alpha(0)``
        before any update after the start)."""
        schedule = cast(BEMA, self.schedules[row])
        return schedule.alpha(max(self.last_update_step - self.start, 0))

    def commit(self, plan: Plan) -> None:
        """Record that ``plan`` was carried out."""
        self.step = plan.step
        if plan.decays:
            self.last_update_step = plan.step
            self.num_updates += 1
            self.last_decays = plan.decays

    @property
    def last_decay_by_name(self) -> dict[str, float | None]:
        """The decay each average received at its last update (``None`` before any)."""
        if self.last_decays is None:
            return dict.fromkeys(self.names)
        return dict(zip(self.names, self.last_decays))

    def state_dict(self) -> dict[str, Any]:
        """Counters, cadence and every schedule's state, as plain Python data."""
        return {
            "step": self.step,
            "last_update_step": self.last_update_step,
            "num_updates": self.num_updates,
            "update_every": self.update_every,
            "start_step": self.start_step,
            "origin": self.origin,
            "last_decays": None if self.last_decays is None else list(self.last_decays),
            "schedules": {n: s.state_dict() for n, s in zip(self.names, self.schedules)},
        }

    def stage_state(self, state: Any) -> Callable[[], None]:
        """Check a :meth:`state_dict` and return the function that loads it (all or nothing).

        Every field and every schedule's state is checked first; the counters must be
        consistent (``last_update_step <= step``, ``num_updates <= step``, one last decay in
        [0, 1] per average). Nothing changes until the returned function is called.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"timeline state must be a mapping, got {type(state).__name__}")
        try:
            schedules = state["schedules"]
            step = _check_int(state["step"], "step", 0)
            last = _check_int(state["last_update_step"], "last_update_step", 0)
            num = _check_int(state["num_updates"], "num_updates", 0)
            origin = _check_int(state.get("origin", 0), "origin", 0)
        except KeyError as e:
            raise ValueError(f"timeline state is missing the field {e.args[0]!r}") from None
        if origin > step:
            raise ValueError(f"inconsistent timeline state: origin={origin} exceeds step={step}")
        if last > step or num > step:
            raise ValueError(
                f"inconsistent timeline state: step={step}, last_update_step={last}, "
                f"num_updates={num} (neither may exceed step)"
            )
        decays = state.get("last_decays")
        if decays is not None:
            if isinstance(decays, (str, bytes)) or not isinstance(decays, Sequence):
                raise TypeError(f"last_decays must be a list of floats, got {decays!r:.80}")
            if len(decays) != len(self.names) or not all(
                isinstance(d, (int, float)) and not isinstance(d, bool) and 0.0 <= d <= 1.0
                for d in decays
            ):
                raise ValueError(
                    f"last_decays must hold {len(self.names)} decays in [0, 1], got {decays!r}"
                )
        if not isinstance(schedules, Mapping):
            raise TypeError(f"timeline schedules must be a mapping, got {schedules!r:.80}")
        check_names(self.names, schedules, "the saved schedules")
        commits = [s.stage_state(schedules[n]) for n, s in zip(self.names, self.schedules)]
        differ = [
            (field, state[field])
            for field in ("update_every", "start_step")
            if field in state and state[field] != getattr(self, field)
        ]

        def commit() -> None:
            for load in commits:
                load()
            for field, saved in differ:
                warn(
                    f"{field} is {getattr(self, field)} here but was {saved} when saved; "
                    f"keeping {getattr(self, field)}",
                    UserWarning,
                    stacklevel=4,
                )
            self.step, self.last_update_step, self.num_updates = step, last, num
            self.origin = origin
            self.last_decays = None if decays is None else tuple(float(d) for d in decays)

        return commit

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters and schedule state; see :meth:`stage_state`."""
        self.stage_state(state)()


@dataclass(frozen=True)
class TimelineState:
    """Where the averages stand in time (a snapshot; read :attr:`EMA.timeline` again for later
    values). Every count is a Python int: reading it never syncs with a device.

    Attributes:
        step: optimizer steps counted so far.
        num_updates: how many times the averages were changed (``step / update_every`` or
            fewer).
        last_update_step: the optimizer step of the last update (0 before any).
        start_step: updates at optimizer steps up to this one copy the weights.
        update_every: the averages change every this many optimizer steps.
        last_decays: the decay each average received at its last update (``None`` before any).
    """

    step: int
    num_updates: int
    last_update_step: int
    start_step: int
    update_every: int
    last_decays: dict[str, float | None]


class TimelineViews:
    """Read-only views of a ``_timeline`` shared by :class:`polyak.EMA`, ``ArrayEMA`` and
    ``PostHocEMA``."""

    _timeline: Timeline

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the averages, in the order given."""
        return self._timeline.names

    @property
    def step(self) -> int:
        """Optimizer steps counted so far (a Python int: reading it never syncs)."""
        return self._timeline.step

    @property
    def timeline(self) -> TimelineState:
        """Every counter at once: steps, updates, the last update's step and decays, the start
        step and the update period (:class:`TimelineState`)."""
        t = self._timeline
        return TimelineState(
            t.step, t.num_updates, t.last_update_step, t.start_step, t.update_every,
            t.last_decay_by_name,
        )  # fmt: skip

    @property
    def num_updates(self) -> int:
        """Deprecated: ``timeline.num_updates``."""
        deprecated(f"{type(self).__name__}.num_updates", "timeline.num_updates")
        return self._timeline.num_updates

    @property
    def last_update_step(self) -> int:
        """Deprecated: ``timeline.last_update_step``."""
        deprecated(f"{type(self).__name__}.last_update_step", "timeline.last_update_step")
        return self._timeline.last_update_step

    @property
    def start_step(self) -> int:
        """Deprecated: ``timeline.start_step``."""
        deprecated(f"{type(self).__name__}.start_step", "timeline.start_step")
        return self._timeline.start_step

    @property
    def last_decays(self) -> dict[str, float | None]:
        """Deprecated: ``timeline.last_decays``."""
        deprecated(f"{type(self).__name__}.last_decays", "timeline.last_decays")
        return self._timeline.last_decay_by_name

    def _row(self, name: str | None) -> int:
        """Index of average ``name``; ``None`` picks the only one (an error when several)."""
        return row_of(self._timeline.names, name)


def row_of(names: Sequence[str], name: str | None) -> int:
    """Position of average ``name`` in ``names``; ``None`` picks the only one.

    Raises:
        ValueError: ``None`` while several averages are kept.
        KeyError: no average has that name (the message lists them).
    """
    if name is None:
        if len(names) > 1:
            raise ValueError(f"several averages are kept; name one of {list(names)}")
        return 0
    if name not in names:
        raise KeyError(f"no average named {name!r}; the averages are {list(names)}")
    return list(names).index(name)
