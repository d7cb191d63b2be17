"""Scheduled write-back: copy an average into the trained model at intervals (Switch EMA, PMA).

A :class:`WriteBack` says when; :func:`polyak.train_with_ema` and the Lightning and Hugging
Face callbacks (``write_back=``) carry it out with :meth:`polyak.EMA.copy_to` on the trained
model, after the average's update of that step, or at the end of the epoch (after that epoch's
evaluation, so the history shows the live weights before the switch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from polyak._torch.ema import EMA

__all__ = ["WriteBack"]

_UNITS = ("steps", "epochs")


@dataclass(frozen=True)
class WriteBack:
    """When to write an average into the trained model, and whether the averages restart.

    Write-backs happen at counts ``start + every, start + 2 every, ...`` up to ``end``, of
    optimizer steps (``unit="steps"``, the EMA's ``step``) or completed epochs
    (``unit="epochs"``). Each is

        theta <- avg            (ema.copy_to(model, average, restart=restart))

    ``restart=False`` is Switch EMA (Li et al., "Switch EMA: A Free Lunch for Better Flatness
    and Sharpness", 2024: at every epoch end, Keras' ``ema_overwrite_frequency`` and
    ema-pytorch's ``update_model_with_ema_every`` per step count): training goes on from the
    average, and every average goes on from where it was. ``restart=True`` is PMA-style (Li et
    al. 2025, MindSpore's ``PmaAdamW``): after writing, the averages start again from the
    written weights and their schedules count from this step, so a uniform or power average
    weighs only the weights after the write-back, a warm-up warms up again, and a constant
    decay, which does not count steps, is simply reset to the written weights (see
    :meth:`polyak.EMA.copy_to`).

    The optimizer is not touched. For SGD with momentum and Adam this means the first step
    after a write-back applies the momentum (Adam's first moment ``m``) gathered along the old
    trajectory at the new point, and Adam's second moment ``v`` keeps scaling the steps as
    before: both describe gradients near the average too when the average is close to the
    live weights (the usual case, a short horizon), and go stale for a long horizon, where the
    jump is large. Reset them yourself (``optimizer.state.clear()``) if that matters; Switch
    EMA and PMA do not. The evidence on write-back is mixed: Switch EMA reports gains on many
    tasks, Morales-Brotons et al. (TMLR 2024, App. C) found per-epoch copy-back hurt on
    CIFAR-100; ``polyak study`` measures it on its data.

    Args:
        every: write back every this many units (``>= 1``).
        unit: ``"epochs"`` (the end of each epoch) or ``"steps"`` (optimizer steps).
        start: the first write-back is at ``start + every`` units.
        end: none after this many units (``None``: until training ends).
        average: which average (default: the first, ``ema.names[0]``).
        restart: restart the averages after writing (PMA-style).

    Examples:
        >>> from polyak.workflows import WriteBack
        >>> wb = WriteBack(every=2, unit="epochs", start=1, end=7)
        >>> [c for c in range(1, 10) if wb.due(c)]
        [3, 5, 7]
    """

    every: int = 1
    unit: Literal["steps", "epochs"] = "epochs"
    start: int = 0
    end: int | None = None
    average: str | None = None
    restart: bool = False

    def __post_init__(self) -> None:
        for field, value, low in (("every", self.every, 1), ("start", self.start, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"WriteBack: {field} must be an int >= {low}, got {value!r}")
        if self.end is not None and (
            isinstance(self.end, bool) or not isinstance(self.end, int) or self.end < 0
        ):
            raise ValueError(f"WriteBack: end must be None or an int >= 0, got {self.end!r}")
        if self.unit not in _UNITS:
            raise ValueError(f"WriteBack: unit must be one of {_UNITS}, got {self.unit!r}")
        if not isinstance(self.restart, bool):
            raise TypeError(f"WriteBack: restart must be True or False, got {self.restart!r}")
        if self.average is not None and not isinstance(self.average, str):
            raise TypeError(f"WriteBack: average must be a name or None, got {self.average!r}")

    def due(self, count: int) -> bool:
        """Whether a write-back is due after ``count`` units (steps or epochs)."""
        after = count - self.start
        return after > 0 and after % self.every == 0 and (self.end is None or count <= self.end)

    def check(self, ema: EMA) -> None:
        """Raise ``ValueError`` if ``average`` is not one of ``ema``'s averages."""
        if self.average is not None and self.average not in ema.names:
            raise ValueError(
                f"WriteBack(average={self.average!r}) is not one of the averages {list(ema.names)}"
            )

    def apply(self, ema: EMA, model: nn.Module, count: int, unit: str) -> bool:
        """Write back if due after ``count`` of ``unit``; return whether it did."""
        if unit != self.unit or not self.due(count):
            return False
        ema.copy_to(model, self.average or ema.names[0], restart=self.restart)
        return True
