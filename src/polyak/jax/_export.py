"""State export: an :class:`EMAState` to plain NumPy arrays and Python data, and back, and to
one ``.npz`` file without pickle (:func:`save`, :func:`load`).

The format follows ``polyak.ArrayEMA.state_dict``: a format tag and version, the leaves' paths,
the schedules' timeline (counters, cadence, each schedule's own state) and one list of arrays per
average, in leaf order. PRNG-key leaves (copied, never averaged) are stored as their key data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polyak._names import check_names
from polyak._npz import load_npz, save_npz
from polyak._state import check_header, skipped_updates
from polyak.errors import NonFiniteError
from polyak.jax._handout import check_handout
from polyak.jax._state import EMAState, Spec, find_state, leaf_paths

__all__ = ["load", "load_state_dict", "save", "state_dict"]

_FORMAT = "polyak.jax"
_VERSION = 1
_INT32_MAX = 2**31 - 1


def _is_key(x: Any) -> bool:
    return bool(jnp.issubdtype(x.dtype, jax.dtypes.prng_key))


def _to_numpy(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if _is_key(x) else x).copy()


def state_dict(state: Any) -> dict[str, Any]:
    """The state as plain data: NumPy arrays (copies), Python numbers and strings.

    Reading it waits for the device (it copies the averages to the host). Warns when an average
    holds inf/nan; with ``nonfinite="raise"``, raises the error an update inside ``jax.jit``
    could not raise. No pickle is needed to save it: :func:`polyak.jax.save` writes it to one
    ``.npz`` file, and Orbax saves the state itself (see the README).

    Args:
        state: an :class:`polyak.jax.EMAState`, or an optax state holding one.

    Raises:
        polyak.NonFiniteError: ``nonfinite="raise"`` and an update inside ``jax.jit`` met
            inf/nan (named); nothing is exported.

    Examples:
        >>> import jax.numpy as jnp, polyak.jax as pj
        >>> sd = pj.state_dict(pj.init({"w": jnp.zeros(2)}, decay=0.9))
        >>> sd["paths"], sd["averages"]["0.9"][0].dtype, sd["timeline"]["step"]
        (["['w']"], dtype('float32'), 0)
    """
    state = find_state(state)
    for row in range(len(state.names)):
        check_handout(state, row, "state_dict()")
    timeline = state.spec.timeline()
    timeline.step = int(state.step)
    timeline.last_update_step = int(state.last_update_step)
    timeline.num_updates = int(state.num_updates)
    if timeline.num_updates:
        timeline.last_decays = tuple(float(d) for d in np.asarray(state.last_decays))
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "paths": leaf_paths(state.averages[0]),
        "timeline": timeline.state_dict(),
        "averages": {
            n: [_to_numpy(x) for x in jax.tree.leaves(avg)]
            for n, avg in zip(state.names, state.averages)
        },
        "skipped_updates": int(state.skipped),
        **(
            {
                "anchors": {
                    state.names[i]: [
                        _to_numpy(x) for x in jax.tree.leaves(state.averages[len(state.names) + j])
                    ]
                    for j, i in enumerate(state.spec.anchored)
                }
            }
            if state.spec.anchored
            else {}
        ),
    }


def _staged(path: str, saved: Any, like: jax.Array) -> np.ndarray:
    """``saved`` checked against the template leaf ``like`` and cast to its dtype (host copy).

    Raises:
        TypeError: not a numeric array, or a kind the leaf cannot take (named).
        ValueError: another shape; NonFiniteError: inf/nan in an averaged leaf.
    """
    key = _is_key(like)
    dtype = jax.random.key_data(like).dtype if key else np.dtype(like.dtype)
    want = jax.random.key_data(like).shape if key else like.shape
    try:
        a = np.asarray(saved)
    except (ValueError, TypeError):  # a ragged list
        a = np.empty(0, object)
    kinds = {"c": "iufc", "f": "iuf"}.get(dtype.kind, "iub")
    if a.dtype.kind not in kinds:
        raise TypeError(
            f"{path}: saved {type(saved).__name__} of dtype {a.dtype}, which the {dtype} leaf "
            "cannot take"
        )
    if a.shape != want:
        raise ValueError(f"{path}: saved shape {a.shape}, expected {want}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(dtype)  # a float32 average stays float32 (values beyond it become inf)
    if dtype.kind in "fc" and not np.isfinite(out).all():
        raise NonFiniteError(f"{path} holds inf/nan (as {dtype}); refusing to load it", [path])
    return out


def _restore(staged: np.ndarray, like: jax.Array) -> jax.Array:
    if _is_key(like):
        return jax.random.wrap_key_data(
            jax.device_put(staged, like.sharding), impl=jax.random.key_impl(like)
        )
    return jax.device_put(staged, like.sharding)


def load_state_dict(template: EMAState, state: Mapping[str, Any]) -> EMAState:
    """A state like ``template`` holding what :func:`state_dict` saved.

    ``template`` (``pj.init(params, decay, ...)`` as at the start of the run) gives the tree,
    the dtypes (values are cast into them: a float32 average stays float32), the placement
    and sharding of every array, and ``nonfinite``. The averages' names must match; a different
    ``update_every`` or ``start_step`` warns and keeps the template's; schedules get back their
    saved mutable state (a half-life's ``batch_size``). Every field and array is checked before
    any array is placed; ``template`` is not changed.

    Raises:
        TypeError: ``template`` is not an :class:`EMAState`; a field or array of another type.
        ValueError: another format, other leaves (paths named), averages, shapes, or counters.
        polyak.NonFiniteError: an average holds inf/nan (named), as ``polyak.EMA`` refuses.

    Examples:
        >>> import jax.numpy as jnp, polyak.jax as pj
        >>> state = pj.update(pj.init({"w": jnp.zeros(2)}, 0.9), {"w": jnp.ones(2)})
        >>> fresh = pj.init({"w": jnp.zeros(2)}, 0.9)
        >>> back = pj.load_state_dict(fresh, pj.state_dict(state))
        >>> int(back.step), back.averages[0]["w"]
        (1, Array([0.1, 0.1], dtype=float32))
    """
    if not isinstance(template, EMAState):
        raise TypeError(f"template must be a polyak.jax EMAState, got {type(template).__name__}")
    state = check_header(state, _FORMAT, _VERSION, ("paths", "averages", "timeline"))
    paths = leaf_paths(template.averages[0])
    saved_paths = state["paths"]
    if not isinstance(saved_paths, list) or not all(isinstance(p, str) for p in saved_paths):
        raise TypeError(
            f"the state dict's 'paths' must be a list of strings, got {saved_paths!r:.80}"
        )
    check_names(paths, saved_paths, "the saved leaves differ from the template's")
    if saved_paths != paths:
        raise ValueError("the saved leaves are those of the template, in another order")
    saved = state["averages"]
    if not isinstance(saved, Mapping):
        raise TypeError(
            f"the state dict's 'averages' must be a mapping, got {type(saved).__name__}"
        )
    check_names(template.names, saved, "the saved averages")
    rows = list(zip(template.names, template.averages))
    if template.spec.anchored:
        anchors = state.get("anchors")
        if not isinstance(anchors, Mapping):
            raise ValueError(
                "the state dict has no 'anchors' for the BEMA averages "
                f"{[template.names[i] for i in template.spec.anchored]}; load a state saved "
                "with the same decays"
            )
        wanted = [template.names[i] for i in template.spec.anchored]
        check_names(wanted, anchors, "the saved anchors")
        saved = {**saved, **{f"anchor of {n}": anchors[n] for n in wanted}}
        rows += [
            (f"anchor of {n}", template.averages[len(template.names) + j])
            for j, n in enumerate(wanted)
        ]
    averages = []
    for name, avg in rows:
        leaves, treedef = jax.tree.flatten(avg)
        arrays = saved[name]
        if not isinstance(arrays, (list, tuple)):
            raise TypeError(
                f"average {name!r}: expected a list of arrays, got {type(arrays).__name__}"
            )
        if len(arrays) != len(leaves):
            raise ValueError(f"average {name!r}: {len(arrays)} arrays saved, {len(leaves)} leaves")
        staged = [_staged(f"{name}{p}", a, x) for p, a, x in zip(paths, arrays, leaves)]
        averages.append((treedef, staged, leaves))
    timeline = template.spec.timeline()
    commit = timeline.stage_state(state["timeline"])
    step, updates = state["timeline"]["step"], state["timeline"]["num_updates"]  # checked
    if step > _INT32_MAX:
        raise ValueError(f"step {step} does not fit the int32 step counter")
    skipped = skipped_updates(state, updates)
    commit()
    decays = timeline.last_decays or (np.nan,) * len(template.names)
    return EMAState(
        averages=tuple(
            jax.tree.unflatten(treedef, [_restore(a, x) for a, x in zip(arr, lv)])
            for treedef, arr, lv in averages
        ),
        step=jnp.asarray(timeline.step, jnp.int32),
        last_update_step=jnp.asarray(timeline.last_update_step, jnp.int32),
        num_updates=jnp.asarray(timeline.num_updates, jnp.int32),
        last_decays=jnp.asarray(decays, template.last_decays.dtype),
        skipped=jnp.asarray(skipped, jnp.int32),
        nonfinite_leaves=jnp.zeros(template.nonfinite_leaves.shape, bool),
        spec=Spec.build(timeline, template.spec.nonfinite),
    )


def save(state: Any, path: str | os.PathLike[str]) -> None:
    """Write :func:`state_dict` of ``state`` to ``path`` as one ``.npz`` file, without pickle.

    The file is a zip of ``state.json`` (paths, counters, schedules) and one ``.npy`` per array,
    written atomically (a crash leaves the previous file); ``path`` is used as given. PRNG-key
    leaves are saved as their key data. Orbax is the other way without pickle (see the README).

    Raises:
        polyak.NonFiniteError: as :func:`state_dict` (nothing is written).

    Examples:
        >>> import jax.numpy as jnp, polyak.jax as pj, tempfile, os
        >>> state = pj.update(pj.init({"w": jnp.zeros(2)}, 0.9), {"w": jnp.ones(2)})
        >>> path = os.path.join(tempfile.mkdtemp(), "ema.npz")
        >>> pj.save(state, path)
        >>> pj.load(pj.init({"w": jnp.zeros(2)}, 0.9), path).averages[0]["w"]
        Array([0.1, 0.1], dtype=float32)
    """
    save_npz(path, state_dict(state))


def load(template: EMAState, path: str | os.PathLike[str]) -> EMAState:
    """:func:`load_state_dict` of what :func:`save` wrote to ``path``.

    The file is untrusted: read without pickle, every member and field checked before any
    array is placed, memory bounded by the file's size.

    Raises:
        FileNotFoundError: no file at ``path``.
        polyak.CheckpointError: the file is not such a state or does not fit ``template``
            (the message names the file and the field or leaf).
        polyak.NonFiniteError: an average in the file holds inf/nan (named).
    """
    if not isinstance(template, EMAState):
        raise TypeError(f"template must be a polyak.jax EMAState, got {type(template).__name__}")
    return load_npz(path, lambda state: load_state_dict(template, state))
