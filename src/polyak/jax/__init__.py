"""polyak for JAX: averages of any pytree with the schedules of :mod:`polyak.schedules`.

``init`` starts averages of a pytree, ``update`` (pure, jit-able) moves them after an optimizer
step, ``average`` reads one; ``ema_of_params`` does the same as the last link of an optax chain,
``swapped`` evaluates a Flax NNX module with an average, and ``state_dict`` /
``load_state_dict`` export the state to NumPy and back (``save`` / ``load``: one ``.npz`` file,
no pickle). ``init(..., nonfinite=...)`` says what an update does with inf/nan, as in
``polyak.EMA``. Needs JAX; ``ema_of_params`` needs optax and ``swapped`` Flax
(``pip install 'polyak[jax]'``).

Example:
    >>> import jax, jax.numpy as jnp, polyak.jax as pj
    >>> from polyak import schedules
    >>> params = {"w": jnp.zeros(3)}
    >>> state = pj.init(params, decay=schedules.warmup(0.999))
    >>> state = jax.jit(pj.update)(state, {"w": jnp.ones(3)})
    >>> pj.average(state)["w"].round(4)
    Array([0.8182, 0.8182, 0.8182], dtype=float32)
"""

from __future__ import annotations

try:
    import jax as _jax  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess
    raise ImportError("polyak.jax needs JAX: pip install 'polyak[jax]' (or pip install jax)") from e

from polyak.jax._export import load, load_state_dict, save, state_dict
from polyak.jax._handout import average
from polyak.jax._nnx import swapped
from polyak.jax._optax import ema_of_params
from polyak.jax._state import EMAState, init
from polyak.jax._update import update

__all__ = [
    "EMAState",
    "average",
    "ema_of_params",
    "init",
    "load",
    "load_state_dict",
    "save",
    "state_dict",
    "swapped",
    "update",
]
