"""``ArrayEMA``: averages of NumPy arrays (a flat vector, or a list / dict tree of arrays)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from polyak._timeline import Timeline, TimelineViews
from polyak._tree import flatten, rebuild
from polyak.kernels import _np_lerp_

__all__ = ["ArrayEMA"]

_FORMAT = "polyak.ArrayEMA"
_VERSION = 1


class ArrayEMA(TimelineViews):
    """Exponential moving averages of NumPy arrays.

    Each update applies, per average and per array,

        avg <- decay_t * avg + (1 - decay_t) * value

    with ``decay_t`` from the average's schedule (a float is a constant decay). By default the
    average starts as a *copy* of the initial values ``x_0`` (``init="copy"``, as every PyTorch
    EMA does); ``init="zero"`` starts from zeros (as optax, Haiku and Adam do).

    **Bias correction.** After updates with decays ``d_1..d_t`` the initial value still carries
    the weight ``w_0 = d_1 * ... * d_t``. ``get(bias_correction=True)`` removes it exactly:

        corrected = (avg - w_0 * x_0) / (1 - w_0)

    which for a zero-initialised average is Adam's ``avg / (1 - decay**t)``
    (Kingma & Ba 2015; TF ``zero_debias``). The common NumPy recipe applies Adam's division to a
    *copy*-initialised average, which is wrong: a constant input ``c`` then reads
    ``c / (1 - decay**t)``, far above ``c`` early on. For ``init="copy"`` the correction needs
    ``x_0``, so one extra copy of the arrays is kept. (To *store* the corrected average instead,
    use ``decay=polyak.schedules.debiased(d)``: the same numbers with no extra copy.) See
    literature.md §4.1.

    Args:
        params: an array, or a list / tuple / dict tree of float arrays (the initial values).
        decay: a float, a schedule, or a sequence / dict of them: one average each.
        init: ``"copy"`` (start at ``params``) or ``"zero"``.
        dtype: dtype of the averages; default: each array's own dtype, at least float32.
        update_every: change the averages every this many calls of :meth:`update`, applying the
            schedule over the whole gap (``decay**k``), so the horizon does not change.
        start_step: calls up to this step copy the values instead of averaging.

    Example:
        >>> import numpy as np
        >>> ema = ArrayEMA(np.zeros(2), decay=0.5)
        >>> ema.update(np.ones(2))
        >>> ema.get()
        array([0.5, 0.5])
        >>> ema.get(bias_correction=True)   # the initial zeros' weight removed
        array([1., 1.])
    """

    def __init__(
        self,
        params: Any,
        decay: Any = 0.999,
        *,
        init: str = "copy",
        dtype: Any = None,
        update_every: int = 1,
        start_step: int = 0,
    ) -> None:
        if init not in ("copy", "zero"):
            raise ValueError(f"init must be 'copy' or 'zero', got {init!r}")
        self._timeline = Timeline(decay, update_every=update_every, start_step=start_step)
        self._init = init
        self._template = params
        items = flatten(params, "params")
        self._paths = [p for p, _ in items]
        self._shapes = []
        dtypes = []
        for path, x in items:
            if not isinstance(x, np.ndarray):
                raise TypeError(f"params at {path}: ArrayEMA takes NumPy arrays, got {type(x)}")
            if x.dtype.kind not in "fc":
                raise TypeError(f"params at {path}: dtype {x.dtype} cannot be averaged")
            self._shapes.append(x.shape)
            dtypes.append(np.result_type(x.dtype, np.float32) if dtype is None else dtype)
        self._dtypes = [np.dtype(d) for d in dtypes]
        self._initial = [np.array(x, dtype=d) for (_, x), d in zip(items, self._dtypes)]
        start = self._initial if init == "copy" else [np.zeros_like(x) for x in self._initial]
        self._avgs = {n: [x.copy() for x in start] for n in self._timeline.names}
        self._leftover = dict.fromkeys(self._timeline.names, 1.0)
        if init == "zero":
            self._initial = []  # a zero start needs no copy of x_0 for the correction

    def _leaves(self, params: Any) -> list[np.ndarray]:
        items = flatten(params, "params")
        paths = [p for p, _ in items]
        if paths != self._paths:
            raise ValueError(f"params structure changed: expected {self._paths}, got {paths}")
        leaves = []
        for (path, x), shape in zip(items, self._shapes):
            if not isinstance(x, np.ndarray) or x.dtype.kind not in "fc":
                raise TypeError(f"params at {path}: expected a float NumPy array, got {x!r:.60}")
            if x.shape != shape:
                raise ValueError(f"params at {path}: shape {x.shape}, expected {shape}")
            leaves.append(x)
        return leaves

    def update(self, params: Any, *, steps: int = 1) -> None:
        """Account for ``steps`` steps and, when due, move every average towards ``params``."""
        leaves = self._leaves(params)
        plan = self._timeline.plan(steps)
        for name, decay in zip(self._timeline.names, plan.decays):
            for avg, x in zip(self._avgs[name], leaves):
                _np_lerp_(avg, x, 1.0 - decay)
            self._leftover[name] *= decay
        self._timeline.commit(plan)

    def get(self, name: str | None = None, *, bias_correction: bool = False) -> Any:
        """A copy of the average ``name`` (needed when several are kept), shaped like ``params``.

        With ``bias_correction=True`` the initial values' leftover weight is removed (see the
        class docstring); this needs at least one update with a decay below 1.
        """
        name = self._timeline.names[self._row(name)]
        avgs = self._avgs[name]
        if not bias_correction:
            return rebuild(self._template, lambda i: avgs[i].copy())
        w0 = self._leftover[name]
        if w0 >= 1.0:
            raise ValueError(
                f"average {name!r} has no update with decay < 1 yet; nothing to correct"
            )
        if self._init == "zero":
            return rebuild(self._template, lambda i: avgs[i] / avgs[i].dtype.type(1.0 - w0))
        x0 = self._initial
        return rebuild(self._template, lambda i: (avgs[i] - w0 * x0[i]) / (1.0 - w0))

    def state_dict(self) -> dict[str, Any]:
        """Plain data: arrays, counters, schedules' state and a format version (copies)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "init": self._init,
            "paths": list(self._paths),
            "timeline": self._timeline.state_dict(),
            "averages": {n: [a.copy() for a in v] for n, v in self._avgs.items()},
            "leftover": dict(self._leftover),
            "initial": [x.copy() for x in self._initial],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; validates everything before changing anything.

        The averages keep their dtype (values are cast into it).
        """
        if state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise ValueError(
                f"not an {_FORMAT} v{_VERSION} state dict: format={state.get('format')!r}, "
                f"version={state.get('version')!r}"
            )
        if state["init"] != self._init:
            raise ValueError(f"saved with init={state['init']!r}, this one has {self._init!r}")
        if list(state["paths"]) != self._paths:
            raise ValueError(f"array paths differ: saved {state['paths']}, have {self._paths}")
        averages = state["averages"]
        if set(averages) != set(self._avgs):
            raise ValueError(f"averages differ: saved {sorted(averages)}, have {self.names}")
        for name, arrays in [*averages.items(), ("initial", state["initial"])]:
            if name == "initial" and self._init == "zero":
                continue
            for path, a, shape in zip(self._paths, arrays, self._shapes):
                if np.shape(a) != shape:
                    raise ValueError(f"{name} at {path}: shape {np.shape(a)}, expected {shape}")
        self._timeline.load_state_dict(state["timeline"])
        for name, arrays in averages.items():
            for avg, a in zip(self._avgs[name], arrays):
                avg[...] = a
        if self._init == "copy":
            for x0, a in zip(self._initial, state["initial"]):
                x0[...] = a
        self._leftover = {n: float(state["leftover"][n]) for n in self._avgs}
