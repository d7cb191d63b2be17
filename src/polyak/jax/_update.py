"""``polyak.jax.update``: one pure, jit-able step of every average.

The timeline rules of :class:`polyak._timeline.Timeline` (``update_every``, ``start_step``, the
schedule applied over the whole gap) are carried out here on traced counters, and the decays
come from the traced twins in :mod:`polyak.jax._decays`, so a jitted update compiles once and
never waits for the host.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from polyak.jax._handout import leaf_flags, raise_pending, traced
from polyak.jax._state import EMAState, Spec, is_averaged, leaf_dtype, leaf_paths, not_an_array

__all__ = ["update"]


def _check_steps(steps: Any) -> None:
    if isinstance(steps, jax.core.Tracer):
        return  # traced: the caller vouches for >= 1
    try:
        if isinstance(steps, bool):
            raise TypeError
        value = operator.index(steps)
    except TypeError:
        raise TypeError(f"steps must be an integer >= 1, got {steps!r}") from None
    if value < 1:
        raise ValueError(f"steps must be >= 1, got {value}")


def matching_leaves(state: EMAState, params: Any) -> list[Any]:
    """The leaves of ``params``, checked against the averages: same tree, shapes and kinds.

    Raises:
        ValueError: another tree structure or shape (the message names the leaves).
        TypeError: a floating leaf where the average copied an integer one, or the reverse.
    """
    reference = state.averages[0]
    leaves, treedef = jax.tree.flatten(params)
    ref_leaves, ref_def = jax.tree.flatten(reference)
    if treedef != ref_def:  # type: ignore[operator]
        have, want = leaf_paths(params), leaf_paths(reference)
        missing = [p for p in want if p not in set(have)]
        extra = [p for p in have if p not in set(want)]
        detail = (
            f"missing {missing}, unexpected {extra}"
            if missing or extra
            else f"same leaves but other containers: {treedef} vs {ref_def}"
        )
        raise ValueError(f"params do not match the average's tree: {detail}")
    for i, (x, avg) in enumerate(zip(leaves, ref_leaves)):
        dtype = leaf_dtype(x)
        if dtype is None:
            raise not_an_array(x, leaf_paths(reference)[i])
        if jnp.shape(x) != avg.shape:
            raise ValueError(
                f"params{leaf_paths(reference)[i]}: shape {jnp.shape(x)}, but the average has "
                f"{avg.shape}"
            )
        if is_averaged(dtype) != is_averaged(avg.dtype):
            kept = "averages" if is_averaged(avg.dtype) else "copies"
            raise TypeError(
                f"params{leaf_paths(reference)[i]}: dtype {dtype}, but the average {kept} a "
                f"{avg.dtype} leaf here"
            )
    return leaves


def _lerp(avg: jax.Array, x: Any, weight: jax.Array) -> jax.Array:
    """``avg + weight * (x - avg)`` in the average's dtype, exact at both ends: ``weight = 1``
    gives ``x`` bit for bit, as ``torch.lerp`` does (for ``weight >= 0.5`` it computes
    ``x - (1 - weight) * (x - avg)``).

    Finite inputs give a finite result: where ``x - avg`` overflows (finite values of opposite
    signs near the max, float32 ``(-3e38, 3e38)``) the same formula runs on the halved inputs,
    where it cannot overflow and rounds to a value between the halves, and is doubled (exact:
    such values are far from subnormal). XLA fuses both into the one pass over the leaf: a few
    more operations per element, 2-8% of the update's time on a 2-core CPU (20.2M parameters).
    """
    if not is_averaged(avg.dtype):
        return jnp.array(x, dtype=avg.dtype, copy=True)
    x = jnp.asarray(x).astype(avg.dtype)
    weight = weight.astype(jnp.finfo(avg.dtype).dtype)
    low = weight < 0.5
    step = jnp.where(low, weight, weight - 1.0)
    diff = x - avg
    out = jnp.where(low, avg, x) + step * diff
    half_avg, half_x = avg * 0.5, x * 0.5
    halved = 2 * (jnp.where(low, half_avg, half_x) + step * (half_x - half_avg))
    # an inf difference of finite inputs (inf/nan inputs keep propagating through ``out``)
    return jnp.where(jnp.isinf(diff) & jnp.isfinite(avg + x), halved, out)


def _plan(spec: Spec, state: EMAState, steps: jax.Array) -> tuple[Any, ...]:
    """Traced :meth:`Timeline.plan`: the new step, whether the averages change, and their
    decays and weights (``1 - decay``)."""
    t = state.step + steps
    since = t - state.last_update_step
    due = since >= spec.update_every
    relative = t - spec.start_step
    t_rel = jnp.maximum(relative, 1)
    dt = jnp.clip(jnp.minimum(since, relative), 1, t_rel)
    pairs = [f(t_rel, dt) for f in spec.twins]
    copying = relative <= 0  # at or before start_step: copy the params
    decays = jnp.where(copying, 0.0, jnp.stack([d for d, _ in pairs]))
    weights = jnp.where(copying, 1.0, jnp.stack([w for _, w in pairs]))
    anchors = [copying | spec.twins[i].anchor_due(t_rel, dt) for i in spec.anchored]  # type: ignore[attr-defined]
    return t, due, decays, weights, anchors


@jax.jit
def _update(state: EMAState, leaves: list[Any], steps: Any) -> EMAState:
    spec = state.spec
    t, due, decays, weights, anchors = _plan(spec, state, jnp.asarray(steps, jnp.int32))
    clean = jnp.zeros(state.nonfinite_leaves.shape, bool)

    def moved(keep: jax.Array | None = None) -> tuple[Any, ...]:
        out = []
        for k, avg in enumerate(state.averages):
            avg_leaves, treedef = jax.tree.flatten(avg)
            if k >= len(spec.names):  # a BEMA anchor: the params where due, else as it was
                take = anchors[k - len(spec.names)]
                new = [
                    jnp.where(take, jnp.asarray(x).astype(a.dtype), a)
                    for a, x in zip(avg_leaves, leaves)
                ]
            else:
                new = [_lerp(a, x, weights[k]) for a, x in zip(avg_leaves, leaves)]
            if keep is not None:
                new = [jnp.where(keep, a, n) for a, n in zip(avg_leaves, new)]
            out.append(jax.tree.unflatten(treedef, new))
        return tuple(out)

    def gated() -> tuple[tuple[Any, ...], jax.Array]:
        if spec.nonfinite == "propagate":
            return moved(), clean
        # One more read of the params, then a select fused into each leaf's update (a lax.cond
        # around the update copied the averages: 3x slower). The barrier keeps XLA from trying
        # to fuse every leaf's reduction into every leaf's update: without it compiling took
        # time quadratic in the leaves (42 s for 195 leaves, 5 minutes for 399 in a loop).
        bad = lax.optimization_barrier(leaf_flags(leaves))
        return moved(bad.any()), bad

    # with update_every > 1, lax.cond skips the memory traffic on the calls in between
    if spec.update_every == 1:
        averages, bad = gated()
    else:
        averages, bad = lax.cond(due, gated, lambda: (state.averages, clean))
    return state.replace(
        averages=averages,
        step=t,
        last_update_step=jnp.where(due, t, state.last_update_step),
        num_updates=state.num_updates + due.astype(jnp.int32),
        last_decays=jnp.where(due, decays.astype(state.last_decays.dtype), state.last_decays),
        skipped=state.skipped + bad.any().astype(jnp.int32),
        nonfinite_leaves=state.nonfinite_leaves | bad,
    )


def update(state: EMAState, params: Any, steps: int = 1) -> EMAState:
    """The state after ``steps`` more optimizer steps: every average moved towards ``params``.

    Pure (returns a new state) and jit-able; call it after each optimizer step, inside your
    jitted train step or on its own. For every floating leaf of every average,

        avg <- avg + (1 - decay_t) * (value - avg)

    in the average's dtype, where ``decay_t`` is the average's schedule over the ``dt`` optimizer
    steps since its previous update (``decay**dt`` for a constant decay), so ``update_every``
    and ``steps`` do not change the horizon. Other leaves are copied. The step counter and the
    decays are traced: no retracing per step, no transfer to the host. When the averages are
    not due (``update_every > 1``) only the counters change.

    To update in place, donate the state: ``jax.jit(pj.update, donate_argnums=0)``.

    Non-finite params (``pj.init(..., nonfinite=...)``, as ``polyak.EMA``): ``"propagate"``
    lets inf/nan in. ``"skip"`` tests every floating leaf (``isfinite(x).all()``, one more read
    of the params) and, when one holds inf/nan, leaves the averages and copied leaves as they
    were (a select on the device, fused into the update: no transfer to the host), still counting
    the step; ``state.skipped`` counts such updates and ``state.nonfinite_leaves`` records the
    leaves. ``"raise"`` does the same on the device and then raises
    :class:`polyak.NonFiniteError` naming the leaves: at once when this function is called
    outside a jax transformation (one transfer of a bool per leaf to the host per call; the
    state you hold is unchanged), and otherwise, since a jitted function cannot raise, at the
    first call outside one: the next eager ``update``, :func:`average`, ``swapped``,
    ``state_dict`` or ``save``. Until then the averages are those of ``"skip"``. We chose this
    over ``jax.experimental.checkify`` (which needs the caller's whole step functionalized) and
    over a host callback (a transfer and a wait every step, and an error JAX wraps in its own
    type); its cost inside ``jax.jit`` is that of ``"skip"``.

    Args:
        state: from :func:`init` or a previous :func:`update`.
        params: the live params, with the tree structure and shapes given to :func:`init`.
        steps: optimizer steps since the previous call (an int ``>= 1``, may be traced).

    Raises:
        TypeError: ``state`` is not an :class:`EMAState`; a leaf changed kind; a bad ``steps``.
        ValueError: ``params`` has another tree structure or shape (named); ``steps < 1``.
        polyak.NonFiniteError: ``nonfinite="raise"``, called outside jit: the params hold
            inf/nan, or an update inside jit met them earlier (the leaves named).

    Examples:
        >>> import jax, jax.numpy as jnp, polyak.jax as pj
        >>> from polyak import schedules
        >>> state = pj.init({"w": jnp.zeros(2)}, decay=schedules.power(gamma=0.0))
        >>> step = jax.jit(pj.update)
        >>> for x in (1.0, 2.0, 3.0):
        ...     state = step(state, {"w": jnp.full(2, x)})
        >>> pj.average(state)["w"]                      # the mean of 1, 2, 3
        Array([2., 2.], dtype=float32)

    References:
        Morales-Brotons, Vogels & Hendrikx, TMLR 2024, App. F (``decay**k`` when updating every
        ``k`` steps); Karras et al., CVPR 2024, Eq. 2 (power averages over a gap).
    """
    if not isinstance(state, EMAState):
        raise TypeError(f"state must be a polyak.jax EMAState (from pj.init), got {type(state)}")
    _check_steps(steps)
    leaves = matching_leaves(state, params)
    eager = state.spec.nonfinite == "raise" and not traced(state) and not traced(leaves)
    if eager:
        raise_pending(state)  # left out inside jax.jit before this call
    new = _update(state, leaves, steps)
    if eager:
        raise_pending(new, this_update=True)  # the one host sync of "raise"
    return new
