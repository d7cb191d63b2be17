"""polyak.jax: BEMA (anchors in the state, reads corrected with the live params, export) and the
traced twins of the weighted schedules, against the float64 references of the torch tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polyak.jax as pj
import reference
from polyak import schedules
from polyak.averages import bema
from polyak.jax._decays import twin
from test_bema import _trajectory


@pytest.mark.parametrize(
    "spec, every",
    [(bema(), 1), (bema(0.6, 0.3, lag=3.0, anchor_step=4), 2), (bema(per_update=True), 3)],
)
def test_bema_matches_the_papers_equations_and_survives_export(spec, every):
    values = [v.astype(np.float32) for v in _trajectory(18)]
    ref = reference.bema(values, spec, every)
    state = pj.init({"w": jnp.asarray(values[0])}, {"plain": 0.9, "b": spec}, update_every=every)
    step = jax.jit(pj.update)
    for t in range(1, len(values)):
        state = step(state, {"w": jnp.asarray(values[t])})
        if t in ref:
            got = pj.average(state, "b", params={"w": jnp.asarray(values[t])})["w"]
            np.testing.assert_allclose(np.asarray(got), ref[t], rtol=1e-5, atol=1e-5)
    live = {"w": jnp.asarray(values[-1])}
    fresh = pj.init({"w": jnp.zeros((3, 4))}, {"plain": 0.9, "b": spec}, update_every=every)
    back = pj.load_state_dict(fresh, pj.state_dict(state))
    assert np.array_equal(
        pj.average(back, "b", params=live)["w"], pj.average(state, "b", params=live)["w"]
    )
    with pytest.raises(TypeError, match="BEMA average: pass params="):
        pj.average(state, "b")
    sd = pj.state_dict(state)
    del sd["anchors"]
    with pytest.raises(ValueError, match="no 'anchors'"):
        pj.load_state_dict(fresh, sd)


def test_nnx_swapped_holds_the_corrected_average():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    state = pj.init(nnx.state(model, nnx.Param), bema())
    for k in range(3):
        shift = 0.5 * (k + 1)
        new = jax.tree.map(lambda x, s=shift: x + s, nnx.state(model, nnx.Param))
        nnx.update(model, new)
        state = pj.update(state, nnx.state(model, nnx.Param))
    want = pj.average(state, params=nnx.state(model, nnx.Param))
    before = model.kernel.get_value()
    with pj.swapped(model, state):
        np.testing.assert_allclose(model.kernel.get_value(), want["kernel"].get_value(), rtol=1e-6)
    assert model.kernel.get_value() is before


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.polynomial(0.0),
        schedules.polynomial(1.5),
        schedules.polynomial(3.0),
        schedules.weighted(lambda t: 1.0 + (t % 5), total_steps=3000),
        schedules.lr_weighted(lambda t: min(1.0, t / 50), total_steps=3000),
        schedules.dino_momentum(500),
        bema(),
        bema(0.7, 0.1, lag=1.0, min_ema_multiplier=0.01, anchor_step=5),
    ],
)
def test_twins_give_the_schedules_weights(schedule):
    fn = jax.jit(twin(schedule))
    for t, dt in [(1, 1), (2, 1), (7, 3), (64, 1), (65, 2), (100, 10), (2999, 1), (3000, 40)]:
        decay, weight = fn(jnp.int32(t), jnp.int32(dt))
        want = 1.0 - schedule(t, dt)
        assert float(weight) == pytest.approx(want, rel=2e-5, abs=1e-7), (t, dt)
        assert float(decay) == pytest.approx(schedule(t, dt), rel=1e-6, abs=1e-7)


def test_weighted_twins_need_their_table_and_end_in_nan_past_it():
    with pytest.raises(TypeError, match="total_steps"):
        twin(schedules.weighted(lambda t: 1.0))
    _, weight = twin(schedules.weighted(lambda t: 1.0, total_steps=4))(jnp.int32(5), jnp.int32(1))
    assert np.isnan(float(weight))
