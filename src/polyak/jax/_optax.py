"""``polyak.jax.ema_of_params``: the averages as the last link of an optax chain."""

from __future__ import annotations

from typing import Any

from polyak._timeline import Timeline
from polyak.jax._state import EMAState, check_mode, init
from polyak.jax._update import update
from polyak.types import DecayLike, NonFinite

__all__ = ["ema_of_params"]


def ema_of_params(
    decay: DecayLike = 0.999,
    *,
    update_every: int = 1,
    start_step: int = 0,
    nonfinite: NonFinite = "propagate",
) -> Any:
    """An optax transformation that keeps averages of the *params* after each step.

    Put it last in ``optax.chain``: its ``update(updates, state, params)`` leaves the updates
    as they are and moves the averages towards ``optax.apply_updates(params, updates)``, the
    params the caller is about to apply, with :func:`polyak.jax.update` (one optimizer step per
    call). Unlike ``optax.ema``, which averages the *updates*, this averages the weights.
    Read the average with ``pj.average(opt_state)``.

    Args:
        decay: as for :func:`polyak.jax.init` (a float, a schedule, a callable, several).
        update_every: change the averages every this many steps (the horizon stays the same).
        start_step: steps ``<= start_step`` copy the params.
        nonfinite: ``"propagate"``, ``"skip"`` or ``"raise"``, as for :func:`polyak.jax.init`.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a
        :class:`polyak.jax.EMAState`.

    Raises:
        TypeError, ValueError: a bad ``decay``, ``update_every``, ``start_step`` or
            ``nonfinite`` (at once);
            ``update`` called without ``params``.

    Examples:
        >>> import jax.numpy as jnp, optax, polyak.jax as pj
        >>> params = {"w": jnp.ones(2)}
        >>> tx = optax.chain(optax.sgd(0.5), pj.ema_of_params(decay=0.9))
        >>> opt_state = tx.init(params)
        >>> updates, opt_state = tx.update({"w": jnp.ones(2)}, opt_state, params)
        >>> params = optax.apply_updates(params, updates)          # w = 0.5
        >>> pj.average(opt_state)["w"]                             # 0.9 * 1 + 0.1 * 0.5
        Array([0.95, 0.95], dtype=float32)

    References:
        optax ``incremental_update`` and ``ema`` (google-deepmind/optax,
        ``optax/_src/update.py``, ``optax/_src/transform.py``).
    """
    import optax

    Timeline(decay, update_every=update_every, start_step=start_step)  # bad arguments fail here
    check_mode(nonfinite)

    def init_fn(params: Any) -> EMAState:
        return init(
            params, decay, update_every=update_every, start_step=start_step, nonfinite=nonfinite
        )

    def update_fn(
        updates: Any, state: EMAState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, EMAState]:
        del extra_args
        if params is None:
            raise ValueError(
                "pj.ema_of_params averages the params: pass them, tx.update(grads, state, params)"
            )
        return updates, update(state, optax.apply_updates(params, updates))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
