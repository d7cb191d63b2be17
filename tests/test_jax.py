"""polyak.jax against the float64 reference: traced schedules, timelines, dtypes, jit, errors."""

from __future__ import annotations

import doctest
import subprocess
import sys
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="polyak.jax needs JAX: pip install 'polyak[jax]'")
jnp = jax.numpy

import polyak.jax as pj  # noqa: E402
import reference  # noqa: E402
from polyak import schedules as S  # noqa: E402
from polyak.jax import _decays  # noqa: E402

rng = np.random.default_rng(3)

SCHEDULES = [
    S.constant(0.999),
    S.constant(0.5),
    S.constant(0.0),
    S.constant(1.0),
    S.halflife(100.0),
    S.halflife(samples=1000, batch_size=7),
    S.power(sigma_rel=0.05),
    S.power(gamma=6.94),
    S.uniform(),
    S.debiased(0.999),
    S.debiased(0.5),
    S.debiased(0.0),
    S.warmup(0.999),
    S.warmup(0.05),
    S.warmup(1.0),
    S.warmup(0.998, period=16, count_from=0),
    S.warmup(0.99, period=3),
    S.warmup(0.0, period=2),
    S.inverse_power(),
    S.inverse_power(0.999, power=0.75),
    S.inverse_power(0.99, inv_gamma=3.0, power=1.0, min_decay=0.5),
    S.inverse_power(0.0),
    S.cosine(0.99, 1.0, total_steps=100),
    S.cosine(0.0, 0.999, total_steps=7),
    S.cosine(0.5, 0.0, total_steps=3),
]
# every t up to 60, then larger ones; gaps from 1 to t (whole runs only while the naive product
# over the gap in polyak.schedules stays quick)
_T = [*range(1, 61), 99, 100, 101, 250, 1000, 9000, 31_623, 100_000, 1_000_000]
GRID = [
    (t, dt) for t in _T for dt in (1, 2, 3, 5, 16, 17, 100, 1000, t) if dt <= t and dt <= 10_000
]


def tree_of(x, dtype=jnp.float32):
    return {"w": jnp.asarray(x, dtype), "b": [jnp.asarray(x[:2], dtype)]}


def test_traced_decays_equal_the_numpy_schedules():
    t, dt = (jnp.asarray([g[i] for g in GRID], jnp.int32) for i in (0, 1))
    twins = [jax.vmap(_decays.twin(s)) for s in SCHEDULES]
    traced = jax.jit(lambda t, dt: [f(t, dt) for f in twins])(t, dt)  # one compilation
    for schedule, (decay, weight) in zip(SCHEDULES, traced):
        expected = np.array([schedule(a, b) for a, b in GRID])
        np.testing.assert_allclose(
            np.asarray(decay, np.float64), expected, rtol=0, atol=3e-7, err_msg=repr(schedule)
        )
        # the update reads 1 - decay: it must keep its relative precision for decays near 1
        np.testing.assert_allclose(
            np.asarray(weight, np.float64), 1.0 - expected, rtol=1e-5, err_msg=repr(schedule)
        )


def test_a_callable_written_with_jax_numpy_is_traced():
    def slow(t, dt):
        return 0.5 ** (dt / (t + 10.0))

    t, dt = jnp.asarray([5, 9, 40]), jnp.asarray([1, 3, 40])
    decay, weight = jax.vmap(_decays.twin(S.as_schedule(slow)))(t, dt)
    expected = [S.as_schedule(slow)(5, 1), S.as_schedule(slow)(9, 3), S.as_schedule(slow)(40, 40)]
    np.testing.assert_allclose(decay, expected, rtol=1e-6)
    np.testing.assert_allclose(weight, 1.0 - np.array(expected), rtol=1e-5)


def test_a_callable_out_of_range_poisons_the_average_instead_of_clipping():
    state = pj.init({"w": jnp.zeros(2)}, decay=lambda t, dt: 1.5 + 0.0 * t)
    with pytest.warns(UserWarning, match=r"average\(\): average '<lambda>' holds inf/nan"):
        avg = pj.average(pj.update(state, {"w": jnp.ones(2)}))
    assert np.isnan(avg["w"]).all()


# one of each kind (their numbers are checked above): the timeline wiring around them
KINDS = [SCHEDULES[i] for i in (0, 5, 6, 8, 10, 16, 20, 23)]


@pytest.mark.parametrize(("update_every", "start_step"), [(1, 0), (3, 7), (16, 10)])
def test_update_matches_the_float64_reference(update_every, start_step):
    init = rng.normal(size=6)
    values = [rng.normal(size=6) for _ in range(50)]
    decay = {str(i): s for i, s in enumerate(KINDS)}
    state = pj.init(tree_of(init), decay, update_every=update_every, start_step=start_step)
    step = jax.jit(pj.update)
    for v in values:
        state = step(state, tree_of(v))
    for name, schedule in decay.items():
        avg = pj.average(state, name)
        for got, pick in ((avg["w"], lambda a: a), (avg["b"][0], lambda a: a[:2])):
            expected = reference.timeline_average(
                [pick(v) for v in values], schedule.per_step, pick(init), update_every, start_step
            )
            np.testing.assert_allclose(
                np.asarray(got, np.float64), expected, atol=3e-6, err_msg=repr(schedule)
            )
    assert int(state.step) == 50
    assert int(state.num_updates) == 50 // update_every


@pytest.mark.parametrize("schedule", [S.warmup(0.99), S.inverse_power(0.99), S.power(gamma=2.0)])
def test_steps_k_equals_k_steps_of_a_held_value(schedule):
    gaps = [1, 3, 2, 7, 1, 16, 5]
    init = rng.normal(size=4)
    values = [rng.normal(size=4) for _ in gaps]
    state = pj.init({"w": jnp.asarray(init, jnp.float32)}, schedule)
    held = []
    for k, v in zip(gaps, values):
        state = pj.update(state, {"w": jnp.asarray(v, jnp.float32)}, steps=k)
        held += [v] * k
    expected = reference.timeline_average(held, schedule.per_step, init)
    np.testing.assert_allclose(pj.average(state)["w"], expected, rtol=0, atol=2e-6)
    assert int(state.step) == sum(gaps) and int(state.num_updates) == len(gaps)
    assert float(state.last_decays[0]) == pytest.approx(schedule(sum(gaps), gaps[-1]), abs=3e-7)


def test_bf16_params_get_a_float32_average_that_tracks_the_float64_one():
    init = rng.normal(size=256)
    values = [init + 0.01 * rng.normal(size=256) + 0.002 * i for i in range(300)]
    bf16 = [np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) for v in values]
    state = pj.init({"w": jnp.asarray(init, jnp.bfloat16)}, decay=0.999)
    step = jax.jit(pj.update)
    for v in values:
        state = step(state, {"w": jnp.asarray(v, jnp.bfloat16)})
    avg = pj.average(state)["w"]
    assert avg.dtype == jnp.float32
    x0 = np.asarray(jnp.asarray(init, jnp.bfloat16), np.float64)
    expected = reference.ema(bf16, [0.999] * 300, x0)
    np.testing.assert_allclose(avg, expected, rtol=0, atol=1e-5)
    # the same average kept in bfloat16 (as optax.incremental_update would) barely moves
    naive = jnp.asarray(init, jnp.bfloat16)
    for v in values:
        naive = 0.001 * jnp.asarray(v, jnp.bfloat16) + 0.999 * naive
    assert (
        np.abs(np.asarray(naive, np.float64) - expected).max()
        > 100 * np.abs(np.asarray(avg) - expected).max()
    )


def test_integer_and_key_leaves_are_copied_and_float16_is_averaged_in_float32():
    params = {
        "h": jnp.ones(3, jnp.float16),
        "n": jnp.arange(3, dtype=jnp.int32),
        "flag": jnp.asarray(True),
        "key": jax.random.key(0),
    }
    state = pj.init(params, decay=0.5)
    avg = pj.average(state)
    assert avg["h"].dtype == jnp.float32 and avg["n"].dtype == jnp.int32
    new = {"h": jnp.zeros(3, jnp.float16), "n": jnp.arange(3, dtype=jnp.int32) + 7}
    new |= {"flag": jnp.asarray(False), "key": jax.random.key(5)}
    avg = pj.average(pj.update(state, new))
    np.testing.assert_array_equal(avg["h"], [0.5] * 3)
    np.testing.assert_array_equal(avg["n"], [7, 8, 9])
    assert not bool(avg["flag"])
    assert (jax.random.key_data(avg["key"]) == jax.random.key_data(jax.random.key(5))).all()


def test_numpy_and_python_leaves_are_taken_as_jax_would_take_them():
    params = {"np64": np.ones(3), "py": 2.0, "n": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "float64 is not available" warning
        state = pj.update(pj.init(params, 0.5), {"np64": np.zeros(3), "py": 4.0, "n": 5})
    avg = pj.average(state)
    assert avg["np64"].dtype == jnp.result_type(float) and avg["n"].dtype == jnp.result_type(int)
    np.testing.assert_array_equal(avg["np64"], [0.5] * 3)
    assert float(avg["py"]) == 3.0 and int(avg["n"]) == 5


def test_the_average_copies_the_params_and_decay_zero_copies_bit_for_bit():
    x = jnp.asarray(rng.normal(size=5), jnp.float32)
    state = pj.init({"w": x}, decay=S.uniform())
    assert pj.average(state)["w"] is not x  # a donated params buffer cannot take it along
    y = jnp.asarray(rng.normal(size=5) * 1e3, jnp.float32)
    state = pj.update(state, {"w": y})  # uniform: the first update copies (decay 0)
    np.testing.assert_array_equal(pj.average(state)["w"], y)


def test_several_averages_in_one_update_equal_separate_ones():
    decays = {"ema": 0.99, "edm": S.power(sigma_rel=0.1), "warm": S.warmup(0.999)}
    init = tree_of(rng.normal(size=8))
    both = pj.init(init, decays, update_every=2)
    alone = {n: pj.init(init, d, update_every=2) for n, d in decays.items()}
    step = jax.jit(pj.update)
    for _ in range(21):
        v = tree_of(rng.normal(size=8))
        both = step(both, v)
        alone = {n: step(s, v) for n, s in alone.items()}
    assert both.names == ("ema", "edm", "warm")
    for i, n in enumerate(decays):
        for a, b in zip(
            jax.tree.leaves(pj.average(both, n)), jax.tree.leaves(pj.average(alone[n]))
        ):
            np.testing.assert_array_equal(a, b)
        assert float(both.last_decays[i]) == float(alone[n].last_decays[0])


def test_jit_traces_once_and_never_transfers_to_the_host():
    traces = []

    @jax.jit
    def train_step(state, params, x):
        traces.append(1)
        return pj.update(state, jax.tree.map(lambda p: p + x, params))

    params = tree_of(rng.normal(size=4))
    state = pj.init(params, {"a": S.inverse_power(), "b": S.warmup(0.9, period=4)}, update_every=3)
    xs = [jnp.asarray(float(i)) for i in range(12)]
    state = train_step(state, params, xs[0])  # compiles
    with jax.transfer_guard("disallow"):
        for x in xs[1:]:
            state = train_step(state, params, x)
    assert len(traces) == 1
    assert int(state.step) == 12 and int(state.num_updates) == 4


@pytest.mark.parametrize("update_every", [1, 3])
def test_a_donated_state_is_updated_in_place_step_after_step(update_every):
    params = tree_of(rng.normal(size=4))
    fresh = pj.init(params, {"a": 0.9, "b": S.uniform()}, update_every=update_every)
    step = jax.jit(pj.update, donate_argnums=0)
    for state in (pj.load_state_dict(fresh, pj.state_dict(fresh)), fresh):
        # a state holding one buffer twice cannot be donated
        pointers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)}
        assert len(pointers) == len(jax.tree.leaves(state))
        for k in range(7):
            state = step(state, tree_of(np.full(4, float(k))))
        # the uniform average of 0..6, or of the values at steps 3 and 6 (2 and 5)
        mean = 3.0 if update_every == 1 else 3.5
        np.testing.assert_allclose(pj.average(state, "b")["w"], mean, rtol=1e-6)


def test_eager_updates_reuse_one_compiled_update():
    from polyak.jax import _update

    state = pj.init(tree_of(np.ones(4)), decay=S.cosine(0.9, 0.99, total_steps=5))
    state = pj.update(state, tree_of(np.zeros(4)))
    before = _update._update._cache_size()
    for k in (1, 2, 3, 4):
        state = pj.update(state, tree_of(np.full(4, k)), steps=k)
    assert _update._update._cache_size() == before


def test_resume_n_export_import_m_equals_n_plus_m_bit_for_bit():
    decay = {"w": S.warmup(0.99, period=2), "p": S.power(gamma=3.0), "h": S.halflife(5.0)}
    template = pj.init(tree_of(np.zeros(5)), decay, update_every=2, start_step=3)
    values = [tree_of(rng.normal(size=5)) for _ in range(20)]
    straight = template
    for v in values:
        straight = pj.update(straight, v)
    half = template
    for v in values[:9]:
        half = pj.update(half, v)
    fresh = pj.init(tree_of(np.ones(5)), decay, update_every=2, start_step=3)
    resumed = pj.load_state_dict(fresh, pj.state_dict(half))
    for v in values[9:]:
        resumed = pj.update(resumed, v)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(resumed) == jax.tree.structure(straight)


def test_state_is_a_plain_pytree_that_survives_numpy_and_unflatten():
    state = pj.init({"w": jnp.ones((2, 3), jnp.bfloat16), "n": jnp.int32(4)}, [0.9, S.uniform()])
    state = pj.update(state, {"w": jnp.zeros((2, 3), jnp.bfloat16), "n": jnp.int32(5)})
    leaves, treedef = jax.tree.flatten(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert len(set(paths)) == len(paths)  # every leaf has its own name, as a checkpoint needs
    back = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    nxt = {"w": jnp.full((2, 3), 2.0, jnp.bfloat16), "n": jnp.int32(6)}
    for a, b in zip(jax.tree.leaves(pj.update(state, nxt)), jax.tree.leaves(pj.update(back, nxt))):
        np.testing.assert_array_equal(a, b)


def test_state_dict_is_plain_data_and_restores_mutable_schedule_state():
    h = S.halflife(samples=100, batch_size=10)
    state = pj.update(pj.init({"w": jnp.zeros(2)}, h), {"w": jnp.ones(2)})
    sd = pj.state_dict(state)
    assert sd["timeline"]["schedules"]["halflife(samples=100)"]["batch_size"] == 10
    assert sd["timeline"]["last_decays"] == [pytest.approx(0.5**0.1)]
    sd["timeline"]["schedules"]["halflife(samples=100)"]["batch_size"] = 20
    template = pj.init({"w": jnp.zeros(2)}, h)
    loaded = pj.load_state_dict(template, sd)
    assert loaded.spec.schedules[0].batch_size == 20 and template.spec.schedules[0].batch_size == 10
    assert h.batch_size == 10  # the caller's schedule is not the state's


def test_load_errors_name_the_problem_and_change_nothing():
    template = pj.init({"w": jnp.zeros(3), "b": jnp.zeros(1)}, {"a": 0.9})
    sd = pj.state_dict(pj.update(template, {"w": jnp.ones(3), "b": jnp.ones(1)}))
    before = pj.state_dict(template)
    bad_shape = {**sd, "averages": {"a": [np.zeros(1), np.zeros(4)]}}
    cases = [
        ({**sd, "format": "polyak.EMA"}, ValueError, "not a polyak.jax v1"),
        ({**sd, "paths": ["['b']", "['x']"]}, ValueError, r"missing \[\"\['w'\]\"\]"),
        ({**sd, "averages": {"z": sd["averages"]["a"]}}, ValueError, r"missing \['a'\], unexp"),
        (bad_shape, ValueError, r"a\['w'\]: saved shape \(4,\), expected \(3,\)"),
        ({**sd, "timeline": {**sd["timeline"], "step": -1}}, ValueError, "step must be >= 0"),
    ]
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match):
            pj.load_state_dict(template, bad)
    after = pj.state_dict(template)
    assert after["timeline"] == before["timeline"]
    for a, b in zip(after["averages"]["a"], before["averages"]["a"]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="template must be a polyak.jax EMAState"):
        pj.load_state_dict(sd, sd)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: pj.init({"w": jnp.zeros(2)}, 1.5), ValueError, r"decay must be in \[0, 1\]"),
        (lambda: pj.init({"w": jnp.zeros(2)}, "fast"), TypeError, "decay must be a number"),
        (lambda: pj.init({"w": jnp.zeros(2)}, 0.9, update_every=0), ValueError, "update_every"),
        (lambda: pj.init({}, 0.9), ValueError, "params holds no arrays"),
        (
            lambda: pj.init({"w": jnp.zeros(2)}, lambda t, dt: min(0.9, float(t))),
            TypeError,
            "write it with jax.numpy",
        ),
        (lambda: pj.update({"w": jnp.zeros(2)}, {"w": jnp.zeros(2)}), TypeError, "EMAState"),
        (lambda: pj.update(_s(), {"v": jnp.zeros(2)}), ValueError, r"missing \[\"\['w'\]\"\]"),
        (lambda: pj.update(_s(), {"w": jnp.zeros(3)}), ValueError, r"params\['w'\]: shape"),
        (lambda: pj.update(_s(), {"w": jnp.zeros(2, jnp.int32)}), TypeError, "averages a float32"),
        (lambda: pj.update(_s(), [jnp.zeros(2)]), ValueError, "params do not match"),
        (lambda: pj.update(_s(), {"w": "ab"}), TypeError, r"params\['w'\]: a str is not an array"),
        (lambda: pj.update(_s(), {"w": jnp.zeros(2)}, steps=0), ValueError, "steps must be >= 1"),
        (lambda: pj.update(_s(), {"w": jnp.zeros(2)}, steps=1.5), TypeError, "steps must be"),
        (lambda: pj.average(_s(), "slow"), KeyError, "no average named 'slow'"),
        (lambda: pj.average(pj.init({"w": jnp.ones(1)}, [0.9, 0.99])), ValueError, "name one of"),
        (lambda: pj.average({"w": jnp.zeros(2)}), TypeError, "expected a polyak.jax EMAState"),
        (lambda: pj.average((_s(), _s())), ValueError, "holds 2 polyak.jax states"),
    ],
)
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _s():
    return pj.init({"w": jnp.zeros(2)}, decay=0.9)


def test_a_schedule_subclass_without_a_traced_form_is_refused():
    class Mine(S.Schedule):
        kind = "mine"

        def _step(self, t):
            return 0.9

    with pytest.raises(TypeError, match="no traced form of the schedule mine"):
        pj.init({"w": jnp.zeros(1)}, Mine())


def test_docstring_examples_hold():
    from polyak.jax import _export, _handout, _nnx, _optax, _state, _update

    for module in (pj, _state, _update, _optax, _nnx, _export, _handout):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_import_polyak_does_not_import_jax_and_polyak_jax_says_how_to_install():
    code = "import sys, polyak; polyak.ArrayEMA; assert 'jax' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    code = "import sys; sys.modules['jax'] = None\nimport polyak.jax"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert "ImportError: polyak.jax needs JAX: pip install 'polyak[jax]'" in err


def test_save_and_load_go_through_one_npz_file_without_pickle(tmp_path):
    import polyak

    params = {"w": jnp.ones((2, 3), jnp.bfloat16), "n": jnp.int32(4), "k": jax.random.key(1)}
    decay = {"a": 0.9, "h": S.halflife(samples=50, batch_size=5)}
    state = pj.init(params, decay, nonfinite="skip")
    for x in (2.0, np.nan, 3.0):
        state = pj.update(state, {**params, "w": jnp.full((2, 3), x, jnp.bfloat16)})
    path = tmp_path / "ema.npz"
    pj.save(state, path)
    with np.load(path, allow_pickle=False) as z:  # plain .npy members
        assert len(z.files) == 1 + 2 * 3
    back = pj.load(pj.init(params, decay, nonfinite="skip"), path)
    assert int(back.skipped) == 1 and back.spec == state.spec
    nxt = {**params, "w": jnp.zeros((2, 3), jnp.bfloat16)}
    state = state.replace(nonfinite_leaves=back.nonfinite_leaves)  # a record, reset by loading
    for a, b in zip(jax.tree.leaves(pj.update(state, nxt)), jax.tree.leaves(pj.update(back, nxt))):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
    # a file that does not fit the template, or is not such a file: named, with the file
    with pytest.raises(polyak.CheckpointError, match=r"ema.npz: the saved averages"):
        pj.load(pj.init(params, {"a": 0.9}), path)
    with pytest.raises(polyak.CheckpointError, match=r"ema.npz: .*saved shape \(2, 3\), expected"):
        pj.load(pj.init({**params, "w": jnp.ones((3, 2))}, decay), path)
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(polyak.CheckpointError, match=r"x.npz is not a polyak .npz state file"):
        pj.load(back, tmp_path / "x.npz")
    with pytest.raises(TypeError, match="template must be a polyak.jax EMAState"):
        pj.load(params, path)


def test_load_names_an_array_of_the_wrong_kind_in_a_state_dict():
    template = pj.init({"w": jnp.zeros(2), "n": jnp.int32(0)}, 0.9)
    sd = pj.state_dict(template)
    cases = [  # the leaves in key order: n, w
        ([np.int32(1), np.array(["a", "b"])], r"0.9\['w'\]: saved ndarray of dtype <U1"),
        ([np.int32(1), [[1.0], [2.0, 3.0]]], r"0.9\['w'\]: saved list of dtype object"),
        ([np.int32(1), np.zeros(2, complex)], r"complex128, which the float32 leaf"),
        ([np.float64(1.5), np.zeros(2)], r"0.9\['n'\]: saved float64 of dtype float64"),
    ]
    for arrays, match in cases:
        with pytest.raises(TypeError, match=match):
            pj.load_state_dict(template, {**sd, "averages": {"0.9": arrays}})
    with pytest.raises(TypeError, match="'averages' must be a mapping"):
        pj.load_state_dict(template, {**sd, "averages": [1]})
    with pytest.raises(TypeError, match="average '0.9': expected a list of arrays, got dict"):
        pj.load_state_dict(template, {**sd, "averages": {"0.9": {}}})
    with pytest.raises(TypeError, match="'paths' must be a list of strings"):
        pj.load_state_dict(template, {**sd, "paths": "['n']"})


@pytest.mark.parametrize("decay", [0.0, 1e-7, 0.25, 0.5, 0.75, 0.999, 1 - 1e-7, 1.0])
def test_finite_params_near_the_dtype_max_give_a_finite_average(decay):
    """``x - avg`` overflows float32 for (-3e38, 3e38): the average must not."""
    big = float(np.finfo(np.float32).max)
    local = np.random.default_rng(7)
    init = np.concatenate([[-0.9, 0.9, -1.0, 1.0, 0.5], local.uniform(-1, 1, 59)]) * big
    value = np.concatenate([[0.9, -0.9, 1.0, -1.0, 0.5], local.uniform(-1, 1, 59)]) * big
    init, value = init.astype(np.float32), value.astype(np.float32)
    step = jax.jit(pj.update)
    state = step(pj.init({"w": jnp.asarray(init)}, decay), {"w": jnp.asarray(value)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hand-out check is exact: no false inf/nan warning
        got = np.asarray(pj.average(state)["w"])
    expected = reference.ema([value], [decay], init)
    assert np.isfinite(got).all()
    scale = np.maximum(np.abs(init), np.abs(value)).astype(np.float64)
    np.testing.assert_array_less(np.abs(got - expected), 4e-7 * scale + 1e-45)
    # inf/nan still enter (nonfinite="propagate"), and ordinary values keep the exact lerp
    bad = pj.update(pj.init({"w": jnp.ones(3)}, decay), {"w": jnp.array([jnp.inf, jnp.nan, 2.0])})
    out = np.asarray(bad.averages[0]["w"])
    if decay < 1.0:
        assert not np.isfinite(out[0]) and np.isnan(out[1])
    w = np.float32(1 - decay)
    lerp = np.float32(1) + w * np.float32(1) if w < 0.5 else np.float32(2) - (1 - w) * np.float32(1)
    assert out[2] == lerp
