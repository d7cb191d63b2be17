"""polyak.jax with the JAX libraries: against optax and Flax NNX's EMA, inside an optax chain and
nnx.Optimizer, and the NNX swap."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="polyak.jax needs JAX: pip install 'polyak[jax]'")
optax = pytest.importorskip("optax", reason="the optax tests need optax")
nnx = pytest.importorskip("flax.nnx", reason="the Flax tests need flax")
jnp = jax.numpy

import polyak.jax as pj  # noqa: E402
import reference  # noqa: E402
from polyak import schedules as S  # noqa: E402

pytestmark = pytest.mark.slow  # differential tests against the JAX peers

rng = np.random.default_rng(5)


class MLP(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.l1 = nnx.Linear(4, 8, rngs=rngs, param_dtype=dtype)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _perturbed(tree, scale=0.1):
    return jax.tree.map(lambda x: x + scale * jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


def test_constant_decay_matches_optax_incremental_update_and_the_reference():
    initial = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4)}
    state, theirs, params = pj.init(initial, 0.97), initial, initial
    stream = []
    for _ in range(60):
        params = _perturbed(params)
        stream.append(params)
        state = pj.update(state, params)
        theirs = optax.incremental_update(params, theirs, step_size=1 - 0.97)
    for key in ("w", "b"):
        ours = pj.average(state)[key]
        np.testing.assert_allclose(ours, theirs[key], rtol=0, atol=2e-6)
        values = [np.asarray(p[key]) for p in stream]
        expected = reference.ema(values, [0.97] * 60, np.asarray(initial[key]))
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)


def test_a_constant_input_is_a_fixed_point_where_optax_drifts():
    x = jnp.asarray(rng.normal(size=4096), jnp.float32)
    decay = {"c": 0.9999, "w": S.warmup(0.9999), "p": S.power(sigma_rel=0.05)}
    state, theirs = pj.init({"w": x}, decay), x
    step = jax.jit(pj.update)
    for _ in range(50):
        state = step(state, {"w": x})
        theirs = optax.incremental_update(x, theirs, step_size=1 - 0.9999)
    for name in decay:
        np.testing.assert_array_equal(pj.average(state, name)["w"], x)
    # (1 - s) * avg + s * x rounds twice: the average walks away from a value it already holds
    assert (np.asarray(theirs) != np.asarray(x)).mean() > 0.01


def test_constant_decay_matches_flax_nnx_ema_on_an_nnx_module():
    assert hasattr(nnx, "EMA"), "this flax has no nnx.EMA"
    model = MLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    theirs = nnx.EMA(params, decay=0.95)
    state = pj.init(params, 0.95)
    for _ in range(40):
        nnx.update(model, _perturbed(nnx.state(model, nnx.Param)))
        theirs.update(nnx.state(model, nnx.Param))
        state = pj.update(state, nnx.state(model, nnx.Param))
    ours = jax.tree.leaves(pj.average(state))
    assert len(ours) == len(jax.tree.leaves(theirs.params)) == 6
    for a, b in zip(ours, jax.tree.leaves(theirs.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_flax_nnx_ema_keeps_a_bf16_average_that_stalls_where_ours_moves():
    model = MLP(nnx.Rngs(0), dtype=jnp.bfloat16)
    params = nnx.state(model, nnx.Param)
    theirs, state = nnx.EMA(params, decay=0.99), pj.init(params, 0.99)
    start = np.asarray(params["l1"]["kernel"][...], np.float64)
    target = start + 0.05  # the weights moved and stay there
    moved = jax.tree.map(lambda x: x, params)
    moved["l1"]["kernel"][...] = jnp.asarray(target, jnp.bfloat16)
    for _ in range(100):
        theirs.update(moved)
        state = pj.update(state, moved)
    live = np.asarray(jnp.asarray(target, jnp.bfloat16), np.float64)
    expected = live + 0.99**100 * (start - live)
    ours = np.asarray(pj.average(state)["l1"]["kernel"][...], np.float64)
    flax = np.asarray(theirs.params["l1"]["kernel"][...], np.float64)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert np.abs(flax - expected).max() > 0.01  # the bf16 average is stuck near the start


def test_ema_of_params_in_an_optax_chain_averages_the_applied_params():
    params = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}
    decay = {"ema": S.warmup(0.99), "swa": S.uniform()}
    tx = optax.chain(optax.adam(0.1), pj.ema_of_params(decay, update_every=2))
    opt_state = tx.init(params)
    state = pj.init(params, decay, update_every=2)

    @jax.jit
    def train_step(params, opt_state):
        grads = jax.grad(lambda p: jnp.sum((p["w"] - 3.0) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(9):
        params, opt_state = train_step(params, opt_state)
        state = pj.update(state, params)  # the same params, averaged by hand
    for name in decay:
        np.testing.assert_array_equal(
            pj.average(opt_state, name)["w"], pj.average(state, name)["w"]
        )
    with pytest.raises(ValueError, match="pass them, tx.update"):
        tx.update(params, opt_state)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        pj.ema_of_params(2.0)


def test_ema_of_params_inside_nnx_optimizer_and_the_swap():
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(optax.sgd(0.05), pj.ema_of_params(0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), jnp.ones((16, 2))

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    model.train()
    for _ in range(5):
        train_step(model, optimizer)
    model.eval()
    avg = pj.average(optimizer.opt_state)
    live = jax.tree.map(lambda v: v, nnx.state(model, nnx.Param))
    assert not np.allclose(avg["l2"]["kernel"][...], live["l2"]["kernel"][...])
    with pj.swapped(model, optimizer.opt_state):
        np.testing.assert_array_equal(model.l2.kernel[...], avg["l2"]["kernel"][...])
    np.testing.assert_array_equal(model.l2.kernel[...], live["l2"]["kernel"][...])


def test_a_whole_nnx_module_with_rng_keys_exports_to_numpy_and_back():
    model = MLP(nnx.Rngs(0, dropout=1))
    template = pj.init(model, {"a": 0.9, "b": S.power(gamma=1.0)})
    nnx.update(model, _perturbed(nnx.state(model, nnx.Param)))
    model.drop.rngs()  # the RNG state moves on: its copy in the average follows
    state = pj.update(template, model)
    sd = pj.state_dict(state)
    assert all(isinstance(a, np.ndarray) for a in sd["averages"]["a"])
    back = pj.load_state_dict(template, sd)

    def plain(x):
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(plain(a), plain(b))
    copied = pj.average(back, "b").drop.rngs.count[...]
    assert int(copied) == int(model.drop.rngs.count[...]) == 1


def test_orbax_saves_the_state_and_restores_it_into_the_shape_of_init(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint", reason="the Orbax test needs orbax-checkpoint")
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "n": jnp.int32(3)}
    decay = {"a": 0.9, "b": S.power(gamma=1.0)}
    state = pj.update(pj.init(params, decay, update_every=2), params)
    state = pj.update(state, {"w": jnp.zeros((4, 3), jnp.bfloat16), "n": jnp.int32(4)})
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ema", state)
    checkpointer.wait_until_finished()
    abstract = jax.eval_shape(lambda: pj.init(params, decay, update_every=2))
    back = checkpointer.restore(tmp_path / "ema", abstract)
    assert isinstance(back, pj.EMAState) and back.spec == state.spec
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_an_equinox_model_s_arrays_and_a_named_error_for_the_rest():
    eqx = pytest.importorskip("equinox", reason="the Equinox test needs equinox")
    model = eqx.nn.MLP(4, 2, 8, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    state = pj.update(pj.init(params, 0.9), jax.tree.map(lambda x: x + 1.0, params))
    averaged = eqx.combine(pj.average(state), static)
    for a, p in zip(jax.tree.leaves(eqx.filter(averaged, eqx.is_array)), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, p + 0.1, rtol=1e-6)
    assert averaged(jnp.ones(4)).shape == (2,)
    with pytest.raises(TypeError, match=r"params\.activation: a custom_jvp is not an array"):
        pj.init(model, 0.9)


def test_the_jax_guide_block_runs():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "jax.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/guides/jax.md", "exec"), scope)
    assert int(scope["ema"].step) == 100 and scope["ema"].names == ("ema", "edm2")
    assert scope["avg"]["w"].shape == (10, 1)


def _snapshot(model):
    return [(p, v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))]


def _same(a, b):
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, x), (_, y) in zip(a, b):
        assert x is y, f"{p} was not given back its own array"


def test_swapped_evaluates_in_the_model_dtype_and_restores_bit_for_bit_on_error():
    model = MLP(nnx.Rngs(0), dtype=jnp.bfloat16)
    model.eval()
    state = pj.init(nnx.state(model, nnx.Param), decay={"a": 0.5, "b": 0.9})
    state = pj.update(state, _perturbed(nnx.state(model, nnx.Param), 1.0))
    before = _snapshot(model)
    x = jnp.ones((2, 4))
    with pj.swapped(model, state, "b"):
        kernel = model.l1.kernel[...]
        assert kernel.dtype == jnp.bfloat16  # the f32 average, cast for evaluation
        expected = pj.average(state, "b")["l1"]["kernel"][...].astype(jnp.bfloat16)
        np.testing.assert_array_equal(kernel, expected)
        out_avg = model(x)
    _same(before, _snapshot(model))
    with pytest.raises(RuntimeError, match="inside"), pj.swapped(model, state, "b"):
        np.testing.assert_array_equal(model(x), out_avg)
        raise RuntimeError("inside")
    _same(before, _snapshot(model))


def test_swapped_failing_midway_changes_nothing(monkeypatch):
    model = MLP(nnx.Rngs(0))
    state = pj.init(nnx.state(model, nnx.Param), 0.5)
    state = pj.update(state, _perturbed(nnx.state(model, nnx.Param), 1.0))
    before = _snapshot(model)
    calls = []
    original = nnx.Variable.set_value

    def flaky(self, value, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two variables already swapped in
            raise MemoryError("injected")
        return original(self, value, *args, **kwargs)

    monkeypatch.setattr(nnx.Variable, "set_value", flaky)
    with pytest.raises(MemoryError), pj.swapped(model, state):
        pass
    monkeypatch.undo()
    _same(before, _snapshot(model))


def test_swapped_with_an_average_of_the_whole_module_and_bad_input():
    model = MLP(nnx.Rngs(0))
    state = pj.init(model, 0.9)  # the module as a pytree: params, BN statistics, RNG state
    moved = _perturbed(nnx.state(model, nnx.Param), 1.0)
    nnx.update(model, moved)
    state = pj.update(state, model)
    avg = pj.average(state)
    assert isinstance(avg, MLP) and avg.drop.rngs.count[...].dtype == jnp.uint32
    before = _snapshot(model)
    with pj.swapped(model, state):
        np.testing.assert_array_equal(model.l1.kernel[...], avg.l1.kernel[...])
    _same(before, _snapshot(model))
    other = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"no variable at \['bn/bias'"), pj.swapped(other, state):
        pass
    with pytest.raises(TypeError, match="flax.nnx.Module"), pj.swapped({"w": 1}, state):
        pass
    plain = pj.init({"w": jnp.zeros(2)}, 0.9)
    with (
        pytest.raises(TypeError, match="average of an NNX module's state"),
        pj.swapped(model, plain),
    ):
        pass
