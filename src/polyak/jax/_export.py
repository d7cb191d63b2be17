"""State export: an :class:`EMAState` to plain NumPy arrays and Python data, and back.

The format follows ``polyak.ArrayEMA.state_dict``: a format tag and version, the leaves' paths,
the schedules' timeline (counters, cadence, each schedule's own state) and one list of arrays per
average, in leaf order. PRNG-key leaves (copied, never averaged) are stored as their key data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polyak._names import check_names
from polyak._state import check_header
from polyak.jax._state import EMAState, Spec, find_state, leaf_paths

__all__ = ["load_state_dict", "state_dict"]

_FORMAT = "polyak.jax"
_VERSION = 1
_INT32_MAX = 2**31 - 1


def _is_key(x: Any) -> bool:
    return bool(jnp.issubdtype(x.dtype, jax.dtypes.prng_key))


def _to_numpy(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if _is_key(x) else x).copy()


def state_dict(state: Any) -> dict[str, Any]:
    """The state as plain data: NumPy arrays (copies), Python numbers and strings.

    Reading it waits for the device (it copies the averages to the host).

    Args:
        state: an :class:`polyak.jax.EMAState`, or an optax state holding one.

    Example:
        >>> import jax.numpy as jnp, polyak.jax as pj
        >>> sd = pj.state_dict(pj.init({"w": jnp.zeros(2)}, decay=0.9))
        >>> sd["paths"], sd["averages"]["0.9"][0].dtype, sd["timeline"]["step"]
        (["['w']"], dtype('float32'), 0)
    """
    state = find_state(state)
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
    }


def _restore(saved: Any, like: jax.Array) -> jax.Array:
    if _is_key(like):
        data = np.asarray(saved, dtype=jax.random.key_data(like).dtype)
        return jax.random.wrap_key_data(
            jax.device_put(data, like.sharding), impl=jax.random.key_impl(like)
        )
    return jax.device_put(np.asarray(saved).astype(like.dtype), like.sharding)


def load_state_dict(template: EMAState, state: Mapping[str, Any]) -> EMAState:
    """A state like ``template`` holding what :func:`state_dict` saved.

    ``template`` (``pj.init(params, decay, ...)`` as at the start of the run) gives the tree,
    the dtypes (values are cast into them: a float32 average stays float32) and the placement
    and sharding of every array. The averages' names must match; a different ``update_every`` or
    ``start_step`` warns and keeps the template's; schedules get back their saved mutable state
    (a half-life's ``batch_size``). ``template`` is not changed.

    Raises:
        TypeError: ``template`` is not an :class:`EMAState`.
        ValueError: another format, other leaves (paths named), averages, shapes, or counters.

    Example:
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
    check_names(paths, state["paths"], "the saved leaves differ from the template's")
    if list(state["paths"]) != paths:
        raise ValueError("the saved leaves are those of the template, in another order")
    saved = state["averages"]
    check_names(template.names, saved, "the saved averages")
    averages = []
    for name, avg in zip(template.names, template.averages):
        leaves, treedef = jax.tree.flatten(avg)
        arrays = saved[name]
        if len(arrays) != len(leaves):
            raise ValueError(f"average {name!r}: {len(arrays)} arrays saved, {len(leaves)} leaves")
        for path, a, like in zip(paths, arrays, leaves):
            want = jax.random.key_data(like).shape if _is_key(like) else like.shape
            if np.shape(a) != want:
                raise ValueError(f"{name}{path}: saved shape {np.shape(a)}, expected {want}")
        averages.append((treedef, arrays, leaves))
    timeline = template.spec.timeline()
    timeline.load_state_dict(state["timeline"])
    if timeline.step > _INT32_MAX:
        raise ValueError(f"step {timeline.step} does not fit the int32 step counter")
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
        spec=Spec.build(timeline),
    )
