"""``ArrayEMA``: averages of NumPy arrays (a flat vector, or a list / dict tree of arrays)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from polyak._names import check_names
from polyak._npz import load_npz, save_npz
from polyak._state import check_header, skipped_updates
from polyak._timeline import Timeline, TimelineViews
from polyak._tree import flatten, rebuild
from polyak.errors import NonFiniteError
from polyak.kernels import _np_lerp_
from polyak.types import ArrayTree, DecayLike, NonFinite

__all__ = ["ArrayEMA"]

_FORMAT = "polyak.ArrayEMA"
_VERSION = 1
_NONFINITE = ("propagate", "raise", "skip")
_PLACEHOLDER = np.empty(0)


def _finite_sum(x: np.ndarray) -> bool:
    """The update's test, as in ``polyak.EMA`` and ``polyak.jax``: a sum in float32 at least is
    inf/nan iff a value is, or when finite values sum past ~3e38 (which count as non-finite);
    faster than ``isfinite(x).all()``, which the hand-out and load checks use."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(x.sum(dtype=np.result_type(x.dtype, np.float32))))


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
    use ``decay=polyak.schedules.debiased(d)``: the same numbers with no extra copy.)

    Non-finite values, as in ``polyak.EMA`` and ``polyak.jax``: with ``nonfinite="propagate"``
    (default) an ``inf``/``nan`` in ``params`` enters the average, and :meth:`get`,
    :meth:`state_dict` and :meth:`save` warn naming the arrays; ``"raise"`` raises
    :class:`polyak.NonFiniteError` naming the arrays (nothing changes); ``"skip"`` leaves the
    averages as they were for that update, as a decay of 1 would (:attr:`skipped_updates`
    counts them); the step still counts. Both read the values once more per update.
    :meth:`load_state_dict` and :meth:`load` refuse a state holding inf/nan.

    Saving: :meth:`state_dict` is arrays and plain Python data; :meth:`save` writes it to one
    ``.npz`` file (no pickle, written atomically) and :meth:`load` reads it back, checking
    every field.

    Args:
        params: an array, or a list / tuple / dict tree of float arrays (the initial values).
        decay: a float, a schedule, or a sequence / dict of them: one average each.
        init: ``"copy"`` (start at ``params``) or ``"zero"``.
        dtype: dtype of the averages; default: each array's own dtype, at least float32.
        update_every: change the averages every this many calls of :meth:`update`, applying the
            schedule over the whole gap (``decay**k``), so the horizon does not change.
        start_step: calls up to this step copy the values instead of averaging.
        nonfinite: ``"propagate"``, ``"raise"`` or ``"skip"`` (see above).

    Examples:
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
        params: ArrayTree,
        decay: DecayLike = 0.999,
        *,
        init: Literal["copy", "zero"] = "copy",
        dtype: npt.DTypeLike | None = None,
        update_every: int = 1,
        start_step: int = 0,
        nonfinite: NonFinite = "propagate",
    ) -> None:
        if init not in ("copy", "zero"):
            raise ValueError(f"init must be 'copy' or 'zero', got {init!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if dtype is not None:
            try:
                kind: str = np.dtype(dtype).kind
            except TypeError:
                kind = "?"
            if kind not in "fc":
                raise TypeError(f"dtype must be a floating NumPy dtype, got {dtype!r}")
        self._timeline = Timeline(decay, update_every=update_every, start_step=start_step)
        if self._timeline.anchored:
            bema = [self._timeline.names[i] for i in self._timeline.anchored]
            raise TypeError(
                f"ArrayEMA keeps no BEMA average ({bema}): its correction needs the live weights "
                "at read time; use polyak.EMA (PyTorch) or polyak.jax"
            )
        self._init = init
        self._nonfinite = nonfinite
        self._skipped = 0
        items = flatten(params, "params")
        for path, x in items:
            if not isinstance(x, np.ndarray):
                raise TypeError(f"params at {path}: ArrayEMA takes NumPy arrays, got {type(x)}")
            if x.dtype.kind not in "fc":
                raise TypeError(f"params at {path}: dtype {x.dtype} cannot be averaged")
        # our own copy of the containers, so that a caller editing its dict changes nothing here
        self._template = rebuild(params, lambda i: _PLACEHOLDER)
        self._paths = [p for p, _ in items]
        self._shapes = [x.shape for _, x in items]
        self._dtypes = [
            np.dtype(np.result_type(x.dtype, np.float32) if dtype is None else dtype)
            for _, x in items
        ]
        self._initial = [np.array(x, dtype=d) for (_, x), d in zip(items, self._dtypes)]
        start = self._initial if init == "copy" else [np.zeros_like(x) for x in self._initial]
        self._avgs = {n: [x.copy() for x in start] for n in self._timeline.names}
        self._leftover = dict.fromkeys(self._timeline.names, 1.0)
        if init == "zero":
            self._initial = []  # a zero start needs no copy of x_0 for the correction

    def _leaves(self, params: Any) -> list[np.ndarray]:
        by_path = dict(flatten(params, "params"))
        check_names(self._paths, by_path, "params structure changed")
        leaves = []
        for path, shape in zip(self._paths, self._shapes):
            x = by_path[path]
            if not isinstance(x, np.ndarray) or x.dtype.kind not in "fc":
                raise TypeError(f"params at {path}: expected a float NumPy array, got {x!r:.60}")
            if x.shape != shape:
                raise ValueError(f"params at {path}: shape {x.shape}, expected {shape}")
            leaves.append(x)
        return leaves

    @property
    def skipped_updates(self) -> int:
        """Updates left out because the values were not finite (``nonfinite="skip"``)."""
        return self._skipped

    def update(self, params: ArrayTree, *, steps: int = 1) -> None:
        """Account for ``steps`` steps and, when due, move every average towards ``params``.

        Raises:
            NonFiniteError: with ``nonfinite="raise"``, ``params`` hold inf/nan.
        """
        leaves = self._leaves(params)
        plan = self._timeline.plan(steps)
        if plan.decays and self._nonfinite != "propagate":
            bad = [p for p, x in zip(self._paths, leaves) if not _finite_sum(x)]
            if bad and self._nonfinite == "raise":
                raise NonFiniteError(
                    f"params hold inf/nan at {bad[:10]}; the averages were not updated "
                    "(nonfinite='raise')",
                    bad,
                )
            if bad:  # as an update with decay 1: the averages and their weights stay
                self._skipped += 1
                self._timeline.commit(plan)
                return
        for name, decay in zip(self._timeline.names, plan.decays):
            for avg, x in zip(self._avgs[name], leaves):
                _np_lerp_(avg, x, 1.0 - decay)
            self._leftover[name] *= decay
        self._timeline.commit(plan)

    def _warn_nonfinite(self, name: str, what: str) -> None:
        bad = [p for p, a in zip(self._paths, self._avgs[name]) if not np.isfinite(a).all()]
        if bad:
            warnings.warn(
                f"{what}: average {name!r} holds inf/nan at {bad[:10]} (the values fed it "
                "non-finite numbers; ArrayEMA(nonfinite='skip' or 'raise') prevents this)",
                UserWarning,
                stacklevel=3,
            )

    def get(self, name: str | None = None, *, bias_correction: bool = False) -> ArrayTree:
        """A copy of the average ``name`` (needed when several are kept), shaped like ``params``.

        With ``bias_correction=True`` the initial values' leftover weight is removed (see the
        class docstring); this needs at least one update with a decay below 1. Warns when the
        average holds inf/nan.
        """
        name = self._timeline.names[self._row(name)]
        avgs = self._avgs[name]
        self._warn_nonfinite(name, "get()")
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
        """Plain data: arrays, counters, schedules' state and a format version (copies).

        Warns when an average holds inf/nan. To save it without pickle, use :meth:`save`.
        """
        for name in self.names:
            self._warn_nonfinite(name, "state_dict()")
        return self._state()

    def _state(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "init": self._init,
            "paths": list(self._paths),
            "timeline": self._timeline.state_dict(),
            "averages": {n: [a.copy() for a in v] for n, v in self._avgs.items()},
            "leftover": dict(self._leftover),
            "initial": [x.copy() for x in self._initial],
            "skipped_updates": self._skipped,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to ``path`` as one ``.npz`` file, atomically, without pickle.

        The file is a zip of ``state.json`` (everything but the arrays) and one ``.npy`` per
        array; ``path`` is used as given (no suffix is added). A crash while writing leaves the
        previous file. Warns when an average holds inf/nan (:meth:`load` would refuse it).

        Examples:
            >>> import numpy as np, tempfile, os
            >>> ema = ArrayEMA({"w": np.zeros(2)}, decay=0.5)
            >>> ema.update({"w": np.ones(2)})
            >>> path = os.path.join(tempfile.mkdtemp(), "ema.npz")
            >>> ema.save(path)
            >>> fresh = ArrayEMA({"w": np.zeros(2)}, decay=0.5)
            >>> fresh.load(path)
            >>> fresh.get()["w"], fresh.step
            (array([0.5, 0.5]), 1)
        """
        for name in self.names:
            self._warn_nonfinite(name, "save()")
        save_npz(path, self._state())

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load what :meth:`save` wrote to ``path``; all or nothing, as :meth:`load_state_dict`.

        The file is untrusted: read without pickle, every member and field checked before
        anything changes, memory bounded by the file's size.

        Raises:
            FileNotFoundError: no file at ``path``.
            polyak.CheckpointError: the file is not such a state, or does not fit this
                ``ArrayEMA`` (the message names the file and the field or array).
            polyak.NonFiniteError: an average in the file holds inf/nan (named).
        """
        load_npz(path, self.load_state_dict)

    def _arrays(self, arrays: Any, what: str) -> list[np.ndarray]:
        """``arrays`` checked against our leaves and cast to our dtypes (copies)."""
        if not isinstance(arrays, Sequence) or isinstance(arrays, (str, bytes)):
            raise TypeError(f"{what} must be a list of arrays, got {type(arrays).__name__}")
        if len(arrays) != len(self._paths):
            raise ValueError(f"{what} has {len(arrays)} arrays, expected {len(self._paths)}")
        out = []
        for path, a, shape, dtype in zip(self._paths, arrays, self._shapes, self._dtypes):
            a = np.asarray(a)
            if a.dtype.kind not in "fc" or (a.dtype.kind == "c" and dtype.kind != "c"):
                raise TypeError(f"{what} at {path}: dtype {a.dtype}, expected {dtype}")
            if a.shape != shape:
                raise ValueError(f"{what} at {path}: shape {a.shape}, expected {shape}")
            if not np.isfinite(a).all():
                raise NonFiniteError(f"{what} at {path} holds inf/nan; refusing to load it", [path])
            out.append(np.array(a, dtype=dtype))
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; validates everything before changing anything.

        The averages keep their dtype (values are cast into it).
        """
        fields = ("init", "paths", "timeline", "averages", "leftover", "initial")
        state = check_header(state, _FORMAT, _VERSION, fields)
        if state["init"] != self._init:
            raise ValueError(f"saved with init={state['init']!r}, this one has {self._init!r}")
        if list(state["paths"]) != self._paths:
            raise ValueError(f"array paths differ: saved {state['paths']}, have {self._paths}")
        averages, leftover = state["averages"], state["leftover"]
        if not isinstance(averages, Mapping) or not isinstance(leftover, Mapping):
            raise TypeError("the state dict's 'averages' and 'leftover' must be mappings")
        check_names(self.names, averages, "the saved averages")
        check_names(self.names, leftover, "the saved leftover weights")
        for name in self.names:
            w = leftover[name]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
                raise ValueError(f"leftover weight of {name!r} must be in [0, 1], got {w!r}")
        staged = {n: self._arrays(averages[n], f"average {n!r}") for n in self.names}
        initial = self._arrays(state["initial"], "initial") if self._init == "copy" else []
        commit_timeline = self._timeline.stage_state(state["timeline"])
        skipped = skipped_updates(state, state["timeline"]["num_updates"])  # checked by stage
        commit_timeline()
        self._skipped = skipped
        self._avgs = staged
        if self._init == "copy":
            self._initial = initial
        self._leftover = {n: float(leftover[n]) for n in self.names}
