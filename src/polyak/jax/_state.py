"""The state of ``polyak.jax``: :class:`EMAState`, :func:`init` and :func:`average`.

The state is a pytree: its arrays (the averages, the step counters, the last decays) are leaves,
and what decides the computation (names, traced twins of the schedules, ``update_every``,
``start_step``) is static metadata in its tree definition, compared by value, so ``jax.jit``
compiles an update once per model and schedule and never per step.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polyak._timeline import Timeline, row_of
from polyak.jax._decays import Twin, twin
from polyak.schedules import Schedule
from polyak.types import DecayLike, NonFinite

__all__ = [
    "NONFINITE",
    "EMAState",
    "check_mode",
    "find_state",
    "init",
    "is_averaged",
    "leaf_dtype",
    "leaf_paths",
    "not_an_array",
]


NONFINITE = ("propagate", "raise", "skip")


def check_mode(nonfinite: object) -> str:
    """``nonfinite`` if it is one of :data:`NONFINITE`, else a ``ValueError`` naming it."""
    if not isinstance(nonfinite, str) or nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    return nonfinite


@dataclass(frozen=True)
class Spec:
    """Static part of an :class:`EMAState` (hashable; part of the jit cache key)."""

    names: tuple[str, ...]
    twins: tuple[Twin, ...]
    update_every: int
    start_step: int
    nonfinite: str
    # The schedules themselves (own copies) are kept for export only: the twins decide.
    schedules: tuple[Schedule, ...] = field(compare=False, repr=False)
    #: rows of the BEMA averages; their anchors are the averages after the K named ones
    anchored: tuple[int, ...] = ()

    @classmethod
    def build(cls, timeline: Timeline, nonfinite: str) -> Spec:
        schedules = tuple(copy.deepcopy(s) for s in timeline.schedules)
        twins = tuple(twin(s) for s in schedules)
        return cls(
            timeline.names,
            twins,
            timeline.update_every,
            timeline.start_step,
            check_mode(nonfinite),
            schedules,
            timeline.anchored,
        )

    def timeline(self) -> Timeline:
        """A fresh :class:`Timeline` over copies of these schedules (counters at 0)."""
        decay = {n: copy.deepcopy(s) for n, s in zip(self.names, self.schedules)}
        return Timeline(decay, update_every=self.update_every, start_step=self.start_step)


@dataclass(frozen=True)
class EMAState:
    """Averages of a pytree and the counters of their schedules (an immutable pytree).

    Attributes:
        averages: one pytree per average, shaped like the params given to :func:`init`:
            floating leaves hold the average (float32 at least), other leaves (integers,
            booleans, PRNG keys) the latest copy; then one anchor per BEMA average
            (:func:`polyak.averages.bema`), in the order of ``spec.anchored``.
        step: optimizer steps counted so far (int32 scalar array).
        last_update_step: the step of the last update that changed the averages.
        num_updates: how many updates changed the averages.
        last_decays: the decay each average received at its last update (NaN before any).
        skipped: updates left out because the params held inf/nan (``nonfinite="skip"``, or
            ``"raise"`` inside ``jax.jit``); kept across :func:`state_dict`.
        nonfinite_leaves: one bool per leaf: it held inf/nan at an update left out since this
            state was made by :func:`init` or :func:`load_state_dict` (what ``"raise"`` names).
        spec: static description: names, schedules, ``update_every``, ``start_step``,
            ``nonfinite``.

    Each update applies ``avg <- avg + (1 - decay_t) * (value - avg)`` to every floating leaf of
    every average (see :func:`polyak.jax.update`).

    Examples:
        >>> import jax.numpy as jnp, polyak.jax as pj
        >>> state = pj.init({"w": jnp.zeros(2)}, decay=[0.9, 0.99], update_every=2)
        >>> state.names, int(state.step), state.spec.update_every
        (('0.9', '0.99'), 0, 2)
    """

    averages: tuple[Any, ...]
    step: jax.Array
    last_update_step: jax.Array
    num_updates: jax.Array
    last_decays: jax.Array
    skipped: jax.Array
    nonfinite_leaves: jax.Array
    spec: Spec

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the averages, in the order given."""
        return self.spec.names

    def replace(self, **changes: Any) -> EMAState:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    EMAState,
    data_fields=[
        "averages",
        "step",
        "last_update_step",
        "num_updates",
        "last_decays",
        "skipped",
        "nonfinite_leaves",
    ],
    meta_fields=["spec"],
)


def is_averaged(dtype: Any) -> bool:
    """Floating and complex leaves are averaged; the others are copied."""
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def leaf_dtype(x: Any) -> Any:
    """The dtype of a leaf that is an array or a number, else ``None``."""
    if isinstance(x, jax.Array):
        return x.dtype
    if isinstance(x, (np.ndarray, np.generic)):  # float64 is float32 unless jax_enable_x64
        return jax.dtypes.canonicalize_dtype(x.dtype)
    if isinstance(x, (int, float, complex)):
        return jnp.result_type(x)
    return None


def leaf_paths(tree: Any) -> list[str]:
    """``keystr`` of every leaf's path, in leaf order (``"['blocks'][0]['w']"``)."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def not_an_array(x: Any, path: str) -> TypeError:
    return TypeError(
        f"params{path}: a {type(x).__name__} is not an array; pass the arrays only, e.g. "
        "nnx.state(model, nnx.Param) or eqx.filter(model, eqx.is_array)"
    )


def _start(x: Any, path: Any) -> jax.Array:
    """A copy of one leaf in the dtype its average keeps (never an alias: the caller may donate
    the params' buffers to its next step)."""
    dtype = leaf_dtype(x)
    if dtype is None:
        raise not_an_array(x, jax.tree_util.keystr(path))
    if is_averaged(dtype):
        dtype = jnp.promote_types(dtype, jnp.float32)
    return jnp.array(x, dtype=dtype, copy=True)


def init(
    params: Any,
    decay: DecayLike = 0.999,
    *,
    update_every: int = 1,
    start_step: int = 0,
    nonfinite: NonFinite = "propagate",
) -> EMAState:
    """Start averages of ``params``: each average is a copy of ``params``.

    Every later :func:`update` applies to each floating leaf of each average

        avg <- avg + (1 - decay_t) * (value - avg)        (= decay_t*avg + (1-decay_t)*value)

    with ``decay_t`` from the average's schedule over the optimizer steps since its previous
    update. Averages are float32 for bfloat16/float16 leaves (whose own precision would freeze
    the average), float64 for float64 leaves; other leaves (integers, PRNG keys) are copied.

    Args:
        params: any pytree of arrays: a dict, a Flax NNX ``State`` or ``Module``, an Equinox
            module's arrays. Sharded arrays keep their sharding.
        decay: a float, a schedule of :mod:`polyak.schedules`, a callable ``(t, dt) -> decay``
            written with ``jax.numpy``, or a sequence / dict of them to keep several averages.
        update_every: change the averages every this many optimizer steps, applying the
            schedule over the whole gap (``decay**k``): the horizon does not depend on it.
        start_step: updates at optimizer steps ``<= start_step`` copy the params.
        nonfinite: what an update does when the params hold inf/nan, as in ``polyak.EMA``:
            ``"propagate"`` (default, no cost: the average takes them, and :func:`average`,
            :func:`swapped` and :func:`state_dict` warn when they hand it out), ``"skip"`` (the
            averages and copied leaves stay as they were for that update, decided on the
            device with no transfer to the host; ``state.skipped`` counts such updates) or
            ``"raise"`` (:class:`polyak.NonFiniteError` naming the leaves, nothing changed;
            see :func:`update` for ``raise`` inside ``jax.jit``). Both read the params once
            more per update.

    Returns:
        The state, a pytree; pass it to :func:`update` under ``jax.jit``.

    Raises:
        TypeError, ValueError: a bad ``decay``, ``update_every``, ``start_step`` or
            ``nonfinite``, a schedule with no traced form, or ``params`` without arrays.

    Examples:
        >>> import jax.numpy as jnp, polyak.jax as pj
        >>> state = pj.init({"w": jnp.zeros(3)}, decay=0.9)
        >>> state = pj.update(state, {"w": jnp.ones(3)})
        >>> pj.average(state)["w"]
        Array([0.1, 0.1, 0.1], dtype=float32)

    References:
        Polyak & Juditsky, SIAM J. Control Optim. 1992; Karras et al., "Analyzing and Improving
        the Training Dynamics of Diffusion Models", CVPR 2024 (power averages over gaps).
    """
    spec = Spec.build(Timeline(decay, update_every=update_every, start_step=start_step), nonfinite)
    pairs, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not pairs:
        raise ValueError(f"params holds no arrays to average (tree {treedef})")
    averages = tuple(
        jax.tree.unflatten(treedef, [_start(x, path) for path, x in pairs])
        for _ in range(len(spec.names) + len(spec.anchored))  # the averages, then BEMA anchors
    )
    nan = jnp.full((len(spec.names),), jnp.nan, jnp.result_type(float))
    # separate arrays, not one shared: a donated state must not hold a buffer twice
    step, last, count, skipped = (jnp.zeros((), jnp.int32) for _ in range(4))
    bad = jnp.zeros((len(pairs),), bool)
    return EMAState(averages, step, last, count, nan, skipped, bad, spec)


def find_state(tree: Any) -> EMAState:
    """``tree`` itself if it is an :class:`EMAState`, else the one state it holds (an optax
    state from :func:`polyak.jax.ema_of_params`, alone or in a chain).

    Raises:
        TypeError: no state in ``tree``.
        ValueError: several states in ``tree``.
    """
    if isinstance(tree, EMAState):
        return tree
    found = [
        x
        for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, EMAState))
        if isinstance(x, EMAState)
    ]
    if not found:
        raise TypeError(
            f"expected a polyak.jax EMAState (from pj.init) or an optax state holding one "
            f"(from pj.ema_of_params), got {type(tree).__name__}"
        )
    if len(found) > 1:
        raise ValueError(
            f"the {type(tree).__name__} holds {len(found)} polyak.jax states; pass the one you mean"
        )
    return found[0]


def index(state: EMAState, name: str | None) -> int:
    """Position of average ``name``; ``None`` picks the only one (an error when several)."""
    return row_of(state.spec.names, name)
