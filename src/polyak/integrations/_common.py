"""What the Lightning and Hugging Face callbacks share: one :class:`Averaging` object each.

It owns everything that does not depend on the framework: the arguments of the
:class:`polyak.EMA` to build once the framework has set the model up, which average is evaluated
and when ("never before the first update"), the count of optimizer steps really taken, the state
loaded from a checkpoint before the EMA exists, and what the model holds at the end.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from polyak import EMA
from polyak._timeline import parse_decays
from polyak._torch import zero
from polyak.errors import CheckpointError
from polyak.workflows.write_back import WriteBack

__all__ = ["EVALUATE", "Averaging", "load_checked", "rng_untouched"]

EVALUATE = ("average", "live", "both")
_EMA_ARGS = tuple(p for p in inspect.signature(EMA).parameters if p not in ("model", "decay"))


class Averaging:
    """The framework-independent half of an ``EMACallback``.

    Args:
        decay: the :class:`polyak.EMA` ``decay`` (a float, a schedule, or a sequence / dict).
        evaluate: ``"average"``, ``"live"`` or ``"both"``.
        average: name of the average that is evaluated (default: the first).
        final_weights: ``"live"``, ``"average"`` (the evaluated one) or an average's name.
        ema_kwargs: further :class:`polyak.EMA` arguments.
        owner: the callback's name, for error messages.
        write_back: when to copy an average into the trained model (or ``None``).
    """

    def __init__(
        self,
        decay: Any,
        *,
        evaluate: str,
        average: str | None,
        final_weights: str,
        ema_kwargs: Mapping[str, Any],
        owner: str,
        write_back: WriteBack | None = None,
    ) -> None:
        if evaluate not in EVALUATE:
            raise ValueError(f"{owner}: evaluate must be one of {EVALUATE}, got {evaluate!r}")
        names, _ = parse_decays(decay)  # checks decay, names the averages as EMA does
        if write_back is not None:
            if not isinstance(write_back, WriteBack):
                raise TypeError(
                    f"{owner}: write_back must be a polyak.workflows.WriteBack, got "
                    f"{type(write_back).__name__}"
                )
            if write_back.average is not None and write_back.average not in names:
                raise ValueError(
                    f"{owner}: WriteBack(average={write_back.average!r}) is not one of the "
                    f"averages {list(names)}"
                )
        if average is None:
            average = names[0]
        elif average not in names:
            raise ValueError(
                f"{owner}: average={average!r} is not one of the averages {list(names)}; name "
                "the evaluated average as `decay` names it (pass a dict to choose the names)"
            )
        choices = ("live", "average", *names)
        if final_weights not in choices:
            raise ValueError(
                f"{owner}: final_weights must be one of {list(choices)}, got {final_weights!r}"
            )
        unknown = sorted(set(ema_kwargs) - set(_EMA_ARGS))
        if unknown:
            raise TypeError(
                f"{owner}: unknown polyak.EMA argument(s) {unknown}; it takes {list(_EMA_ARGS)}"
            )
        self.decay = decay
        self.evaluate = evaluate
        self.average = average
        self.final_weights = final_weights
        self.ema_kwargs = dict(ema_kwargs)
        self.names = names
        #: metric tag of the evaluated average: "ema", or "ema[<name>]" among several
        self.label = "ema" if len(names) == 1 else f"ema[{average}]"
        self.ema: EMA | None = None
        self.pending: Mapping[str, Any] | None = None  # loaded before the EMA was built
        self._pending_source = ""
        self._steps = 0  # optimizer steps taken since the last update
        self._hooks: list[Any] = []
        self.write_back = write_back
        self._written: tuple[str, int] | None = None  # (unit, count) of the last write-back
        self._engine: Any = None  # a DeepSpeed engine whose applied steps are counted
        self._applied = 0  # its count at the last update

    # ----------------------------------------------------------------- building
    def build(self, model: nn.Module) -> EMA:
        """A new EMA of ``model``'s weights as they are now, with the pending state loaded."""
        ema = EMA(model, self.decay, **self.ema_kwargs)
        if self.pending is not None:
            load_checked(ema, self.pending, self._pending_source)
        self.ema, self.pending = ema, None
        self._steps = 0
        return ema

    def load(self, state: Mapping[str, Any], source: str) -> None:
        """Load ``EMA.state_dict()`` output read from ``source`` (a file and field, for
        messages) now, or when the EMA is built; see :func:`load_checked`."""
        if self.ema is None:
            self.pending, self._pending_source = state, source
        else:
            load_checked(self.ema, state, source)

    def checkpoint_state(self) -> dict[str, Any] | None:
        """``EMA.state_dict()`` to checkpoint; under FSDP2 the full tensors, gathered by a
        collective that every rank must join (``None`` on ranks other than 0)."""
        assert self.ema is not None
        return self.ema.state_dict(full=True)

    # ----------------------------------------------------------------- counting steps
    def count_steps(self, optimizer: torch.optim.Optimizer, engine: Any = None) -> None:
        """Count the steps ``optimizer`` really takes (from now on, instead of any other's).

        A step post-hook runs only when ``optimizer.step()`` runs: a step that a gradient scaler
        skips (inf/NaN gradients) is not counted. Wrappers exposing the optimizer as
        ``.optimizer`` (Accelerate's) are looked through. When ``engine`` is a DeepSpeed engine,
        the optimizer steps inside ``engine.step()`` (its wrapper's ``step()`` does nothing,
        and ZeRO steps the inner optimizer once per parameter group), so the engine's count
        of applied steps is read instead: ``global_steps - skipped_steps`` (an fp16 step skipped
        for overflow does not count).
        """
        self.release()
        if zero.engine_module(engine) is not None:
            self._engine, self._applied, self._steps = engine, _applied(engine), 0
            return
        inner = getattr(optimizer, "optimizer", None)
        while isinstance(inner, torch.optim.Optimizer):
            optimizer, inner = inner, getattr(inner, "optimizer", None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._hooks.append(optimizer.register_step_post_hook(self._count))
        self._steps = 0

    def _count(self, *_: Any) -> None:
        self._steps += 1

    def update(self) -> None:
        """Update the averages once for the optimizer steps taken since the last call."""
        if self._engine is not None:
            now = _applied(self._engine)
            self._steps, self._applied = self._steps + now - self._applied, now
        if self._steps and self.ema is not None:
            self.ema.update(steps=self._steps)
            self._steps = 0

    def write_back_after(self, model: nn.Module, unit: str, count: int) -> None:
        """Carry out the write-back due after ``count`` ``unit`` (once per count)."""
        if self.write_back is None or self.ema is None or self._written == (unit, count):
            return
        if self.write_back.apply(self.ema, model, count, unit):
            self._written = (unit, count)

    def release(self) -> None:
        """Stop counting optimizer steps."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._engine = None

    # ----------------------------------------------------------------- evaluating
    def has_average(self) -> bool:
        """Whether an average exists that differs from a copy of the initial weights: never
        evaluate or export one before its first update."""
        return self.ema is not None and self.ema.timeline.num_updates > 0

    def swapped(self, model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """``ema.swapped`` for the evaluated average."""
        assert self.ema is not None
        return self.ema.swapped(model, name=self.average)

    def finish(self, model: nn.Module) -> None:
        """Copy the average ``final_weights`` names into ``model`` (nothing for ``"live"``)."""
        if self.final_weights == "live" or not self.has_average():
            return
        assert self.ema is not None
        name = self.average if self.final_weights == "average" else self.final_weights
        self.ema.copy_to(model, name=name)


def _applied(engine: Any) -> int:
    """Optimizer steps a DeepSpeed engine applied (its steps minus the skipped ones)."""
    return int(engine.global_steps) - int(engine.skipped_steps)


def load_checked(ema: EMA, state: Mapping[str, Any], source: str) -> None:
    """``ema.load_state_dict(state)`` for a state read from a checkpoint: all or nothing, and a
    state that does not load (another model, other averages, a bad field or tensor) is one
    :class:`polyak.CheckpointError` naming ``source``, its cause chained."""
    try:
        ema.load_state_dict(state)  # checks everything before changing anything
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"{source}: the saved EMA state does not load into this callback's EMA: {e}. Resume "
            "with the model, decay and EMA arguments it was saved with"
        ) from e


@contextlib.contextmanager
def rng_untouched(model: nn.Module) -> Iterator[None]:
    """Leave the global random streams (CPU, and the model's CUDA device) as they were.

    An extra evaluation pass draws from them (every DataLoader iterator draws its base seed), so
    without this, dropout and shuffling after it would differ from a run without the callback.
    """
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield
