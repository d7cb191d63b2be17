"""polyak.jax on 2 CPU devices: the averages keep the params' NamedSharding and a jitted update
compiles to no collective (XLA's device count is fixed when JAX starts: a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="polyak.jax needs JAX: pip install 'polyak[jax]'")

pytestmark = pytest.mark.slow  # a subprocess with two JAX devices

_SCRIPT = r"""
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import polyak.jax as pj
from polyak import schedules


assert jax.device_count() == 2, jax.devices()
rng = np.random.default_rng(0)
COLLECTIVE = (r"all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all"
              r"|collective-broadcast|send|recv")

def check(axis_type):
    mesh = jax.make_mesh((2,), ("x",), axis_types=(getattr(AxisType, axis_type),))
    rows, whole = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())

    def params_like(scale):
        return {
            "w": jax.device_put(jnp.asarray(scale * rng.normal(size=(8, 6)), jnp.bfloat16), rows),
            "v": jax.device_put(jnp.asarray(scale * rng.normal(size=(4, 10)), jnp.float32), rows),
            "b": jax.device_put(jnp.asarray(rng.normal(size=6), jnp.float32), whole),
            "n": jax.device_put(jnp.arange(8, dtype=jnp.int32), rows),
        }

    decay = {"ema": schedules.warmup(0.99), "edm": schedules.power(sigma_rel=0.1)}
    params = params_like(1.0)
    for state in (pj.init(params, decay, update_every=2),
                  jax.jit(lambda p: pj.init(p, decay, update_every=2))(params)):
        for avg in state.averages:
            for key, x in params.items():
                assert avg[key].sharding.is_equivalent_to(x.sharding, x.ndim), key

    hlo = jax.jit(pj.update).lower(state, params).compile().as_text()
    assert not re.findall(COLLECTIVE, hlo), sorted(set(re.findall(COLLECTIVE, hlo)))
    if axis_type == "Auto":  # control: an average sharded otherwise needs data moved, and shows it
        cols = NamedSharding(mesh, P(None, "x"))
        other = pj.init({k: jax.device_put(v, cols) for k, v in params.items() if v.ndim == 2}, 0.9)
        moved = {k: v for k, v in params.items() if v.ndim == 2}
        assert re.findall(COLLECTIVE, jax.jit(pj.update).lower(other, moved).compile().as_text())

    step = jax.jit(pj.update, donate_argnums=0)
    plain = pj.init(jax.device_get(params), decay, update_every=2)
    for _ in range(5):
        new = params_like(1.0)
        state = step(state, new)
        plain = pj.update(plain, jax.device_get(new))
    for avg, ref in zip(state.averages, plain.averages):
        for key, x in params.items():
            assert avg[key].sharding.is_equivalent_to(x.sharding, x.ndim), (key, avg[key].sharding)
            np.testing.assert_array_equal(np.asarray(avg[key]), np.asarray(ref[key]))

for axis_type in ("Explicit", "Auto"):  # sharding in types, and GSPMD propagation
    check(axis_type)
print("ok")
"""


def test_sharded_params_keep_their_sharding_and_the_update_has_no_collectives():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")
