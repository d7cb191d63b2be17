"""``polyak.jax.swapped``: evaluate a Flax NNX module with an average, then restore its weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp

from polyak.jax._handout import alpha, check_handout
from polyak.jax._state import find_state, index

__all__ = ["swapped"]


def _flat(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
    from flax import nnx

    return list(nnx.to_flat_state(tree))


def _value(leaf: Any) -> Any:
    from flax import nnx

    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _average_state(state: Any, name: str | None, row: int | None = None) -> Any:
    from flax import nnx

    state = find_state(state)
    if row is None:
        row = index(state, name)
        check_handout(state, row, "swapped()", stacklevel=5)
    avg = state.averages[row]
    if isinstance(avg, nnx.Module):
        return nnx.state(avg)
    if not isinstance(avg, nnx.State):
        raise TypeError(
            f"swapped() needs an average of an NNX module's state, e.g. "
            f"pj.init(nnx.state(model, nnx.Param)); this one is a {type(avg).__name__}"
        )
    return avg


@contextlib.contextmanager
def swapped(model: Any, state: Any, name: str | None = None) -> Iterator[Any]:
    """Context manager: ``model`` holds average ``name`` inside the block.

    Each variable of ``model`` that the average covers (matched by its path in the module)
    takes the average's value, cast to the variable's own dtype (a bfloat16 model evaluates in
    bfloat16, from the float32 average). On exit, also when the block raises, every one of them
    gets back the very array it held before, so the module comes back bit for bit. Variables
    the average does not cover are left alone. A BEMA average (:func:`polyak.averages.bema`)
    holds ``ema + alpha (live - anchor)``, with the module's own values as the live weights.

    Training inside the block would train the average's copy and be undone on exit: evaluate
    only.

    Args:
        model: a Flax NNX ``Module``.
        state: an :class:`polyak.jax.EMAState` (or an optax state holding one) built on the
            module's state, ``pj.init(nnx.state(model, nnx.Param))``, or on the module itself.
        name: which average, when several are kept.

    Yields:
        ``model``.

    Raises:
        TypeError: ``model`` is not an NNX module, or the average is not an NNX state.
        ValueError: the average has variables the module lacks, or other shapes (named).
            Nothing is changed then.

    Examples:
        >>> import jax, jax.numpy as jnp, polyak.jax as pj
        >>> from flax import nnx
        >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        >>> state = pj.init(nnx.state(model, nnx.Param), decay=0.0)  # 0: the average copies
        >>> state = pj.update(state, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
        >>> with pj.swapped(model, state):
        ...     print(model(jnp.ones((1, 2))))
        [[0.]]

    See ``polyak.EMA.swapped`` for the PyTorch twin; Flax's ``nnx.EMA.apply_to`` builds a new
    module instead (flax ``flax/nnx/training/ema.py``).
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    live = dict(_flat(nnx.state(model)))
    missing, staged = [], []
    ema = find_state(state)
    row = index(ema, name)
    anchors: dict[Any, Any] = {}
    if row in ema.spec.anchored:  # BEMA: the correction from the module's own values
        at = len(ema.names) + ema.spec.anchored.index(row)
        anchors = dict(_flat(_average_state(ema, None, at)))
        weight = alpha(ema, row)
    for path, leaf in _flat(_average_state(state, name)):
        target = live.get(path)
        if not isinstance(target, nnx.Variable):
            missing.append("/".join(map(str, path)))
            continue
        old, new = target.get_value(), _value(leaf)
        if jnp.shape(old) != jnp.shape(new):
            raise ValueError(
                f"{'/'.join(map(str, path))}: the module has shape {jnp.shape(old)} but the "
                f"average has {jnp.shape(new)}"
            )
        new = jnp.asarray(new)
        if path in anchors and jnp.issubdtype(new.dtype, jnp.inexact):
            anchor = jnp.asarray(_value(anchors[path]))
            new = new + weight.astype(new.dtype) * (jnp.asarray(old).astype(new.dtype) - anchor)
        staged.append((target, old, new if new.dtype == old.dtype else new.astype(old.dtype)))
    if missing:
        raise ValueError(f"the module has no variable at {missing}, which the average holds")
    swapped_in = []
    try:
        for target, old, new in staged:
            target.set_value(new)
            swapped_in.append((target, old))
        yield model
    finally:
        for target, old in reversed(swapped_in):
            target.set_value(old)
