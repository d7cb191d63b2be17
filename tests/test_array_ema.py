"""ArrayEMA against the float64 reference; bias correction; several averages; state."""

from __future__ import annotations

import numpy as np
import pytest

import polyak
import reference
from polyak import ArrayEMA, schedules

rng = np.random.default_rng(1)


def stream(n, shape=(6,)):
    return [rng.normal(size=shape) for _ in range(n)]


def test_matches_reference_constant_and_structures():
    init = {"w": rng.normal(size=(3, 2)), "b": [rng.normal(size=4)]}
    values = [{"w": rng.normal(size=(3, 2)), "b": [rng.normal(size=4)]} for _ in range(40)]
    ema = polyak.ArrayEMA(init, decay=0.9)
    for v in values:
        ema.update(v)
    got = ema.get()
    assert set(got) == {"w", "b"} and isinstance(got["b"], list)
    for key in ("w",):
        exp = reference.ema([v[key] for v in values], [0.9] * 40, init[key])
        np.testing.assert_allclose(got[key], exp, rtol=1e-12)
    exp = reference.ema([v["b"][0] for v in values], [0.9] * 40, init["b"][0])
    np.testing.assert_allclose(got["b"][0], exp, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 16])
@pytest.mark.parametrize(
    "sched", [schedules.constant(0.95), schedules.warmup(0.99), schedules.power(gamma=3.0)]
)
def test_update_every_and_start_step_match_reference(k, sched):
    init, values = rng.normal(size=5), stream(100, (5,))
    for start in (0, 10):
        ema = polyak.ArrayEMA(init, decay=sched, update_every=k, start_step=start)
        for v in values:
            ema.update(v)
        exp = reference.timeline_average(values, sched.per_step, init, k, start)
        np.testing.assert_allclose(ema.get(), exp, rtol=1e-10, atol=1e-12)


def test_update_every_k_equals_subsampled_stream_with_decay_power_k():
    init, values = rng.normal(size=4), stream(64, (4,))
    ema = polyak.ArrayEMA(init, decay=0.99, update_every=16)
    for v in values:
        ema.update(v)
    sub = values[15::16]
    exp = reference.ema(sub, [0.99**16] * len(sub), init)
    np.testing.assert_allclose(ema.get(), exp, rtol=1e-12)
    assert ema.timeline.last_decays == {"0.99": pytest.approx(0.99**16)}


def test_steps_argument_for_irregular_gaps():
    a, b = polyak.ArrayEMA(np.zeros(2), 0.9), polyak.ArrayEMA(np.zeros(2), 0.9)
    a.update(np.ones(2), steps=5)
    for _ in range(5):
        b.update(np.ones(2))  # same value held for 5 steps
    np.testing.assert_allclose(a.get(), b.get(), rtol=1e-12)
    assert a.step == b.step == 5


def test_bias_correction_copy_init_removes_initial_weight_exactly():
    init, values = rng.normal(size=3) + 10, stream(25, (3,))
    ema = polyak.ArrayEMA(init, decay=0.9)
    zero = polyak.ArrayEMA(init, decay=0.9, init="zero")
    deb = polyak.ArrayEMA(init, decay=schedules.debiased(0.9))
    for v in values:
        ema.update(v)
        zero.update(v)
        deb.update(v)
    m = reference.ema(values, [0.9] * 25, np.zeros(3))  # zero-init average of x_1..x_t
    adam = m / (1 - 0.9**25)
    np.testing.assert_allclose(ema.get(bias_correction=True), adam, rtol=1e-10)
    np.testing.assert_allclose(zero.get(bias_correction=True), adam, rtol=1e-10)
    np.testing.assert_allclose(zero.get(), m, rtol=1e-12)
    np.testing.assert_allclose(deb.get(), adam, rtol=1e-10)


def test_common_numpy_recipe_is_wrong_for_a_copy_and_ours_is_not():
    c = np.full(3, 2.0)
    ema = polyak.ArrayEMA(c, decay=0.99)
    for _ in range(10):
        ema.update(c)
    recipe = ema.get() / (1 - 0.99**10)  # Adam's division applied to a copy-initialised average
    assert recipe[0] > 20  # ~10.5x the constant it averages
    np.testing.assert_allclose(ema.get(bias_correction=True), c, rtol=1e-12)


def test_bias_correction_before_any_update_is_an_error():
    ema = polyak.ArrayEMA(np.zeros(2), 0.9)
    with pytest.raises(ValueError, match="no update"):
        ema.get(bias_correction=True)


def test_several_averages_equal_separate_objects_bit_for_bit():
    init, values = rng.normal(size=8).astype(np.float32), stream(30, (8,))
    decays = {"fast": 0.9, "slow": schedules.warmup(0.999), "pow": schedules.power(0.1)}
    multi = polyak.ArrayEMA(init, decays)
    singles = {n: polyak.ArrayEMA(init, d) for n, d in decays.items()}
    for v in values:
        v = v.astype(np.float32)
        multi.update(v)
        for s in singles.values():
            s.update(v)
    for n, s in singles.items():
        np.testing.assert_array_equal(multi.get(n), s.get())
    with pytest.raises(ValueError, match="several averages"):
        multi.get()
    with pytest.raises(KeyError, match="nope"):
        multi.get("nope")
    assert multi.names == ("fast", "slow", "pow")
    seq = polyak.ArrayEMA(init, [0.9, 0.99])
    assert seq.names == ("0.9", "0.99")
    with pytest.raises(ValueError, match="pass a dict"):
        polyak.ArrayEMA(init, [0.9, 0.9])


def test_dtype_float32_by_default_for_float16_input_and_kept_on_load():
    ema = polyak.ArrayEMA(np.ones(3, np.float16), 0.9)
    assert ema.get().dtype == np.float32
    sd = ema.state_dict()
    sd["averages"]["0.9"][0] = sd["averages"]["0.9"][0].astype(np.float16)
    ema.load_state_dict(sd)
    assert ema.get().dtype == np.float32


@pytest.mark.parametrize(
    "sched",
    [
        0.97,
        schedules.warmup(0.99),
        schedules.power(0.05),
        schedules.halflife(samples=640, batch_size=32),
    ],
)
def test_resume_is_exact(sched):
    init, values = rng.normal(size=6), stream(50, (6,))
    full = polyak.ArrayEMA(init, sched, update_every=3)
    for v in values:
        full.update(v)
    first = polyak.ArrayEMA(init, sched, update_every=3)
    for v in values[:20]:
        first.update(v)
    state = first.state_dict()
    resumed = polyak.ArrayEMA(np.zeros(6), sched, update_every=3)
    resumed.load_state_dict(state)
    for v in values[20:]:
        resumed.update(v)
    np.testing.assert_array_equal(resumed.get(), full.get())
    np.testing.assert_array_equal(resumed.get(bias_correction=True), full.get(bias_correction=True))
    assert resumed.step == full.step == 50


def test_bad_input():
    with pytest.raises(TypeError, match="int64"):
        polyak.ArrayEMA(np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="init"):
        polyak.ArrayEMA(np.zeros(2), init="ones")
    ema = polyak.ArrayEMA([np.zeros(2)], 0.9)
    with pytest.raises(ValueError, match=r"\[0\]: shape \(3,\)"):
        ema.update([np.zeros(3)])
    with pytest.raises(ValueError, match="structure"):
        ema.update([np.zeros(2), np.zeros(2)])
    with pytest.raises(ValueError, match="steps"):
        ema.update([np.zeros(2)], steps=0)
    with pytest.raises(ValueError, match="decay"):
        polyak.ArrayEMA(np.zeros(2), decay=1.2)
    sd = ema.state_dict()
    sd["averages"]["0.9"] = [np.zeros(5)]
    before = ema.get()
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict(sd)
    np.testing.assert_array_equal(ema.get(), before)
    with pytest.raises(ValueError, match="format"):
        ema.load_state_dict({"format": "other"})


def test_integer_dtype_is_refused():
    with pytest.raises(TypeError, match="floating NumPy dtype"):
        ArrayEMA(np.zeros(3), dtype=np.int32)
    with pytest.raises(TypeError, match="floating NumPy dtype"):
        ArrayEMA(np.zeros(3), dtype="not a dtype")


def test_keeps_its_own_structure_and_matches_dict_keys_in_any_order():
    params = {"w": np.zeros(2), "b": np.zeros(1)}
    ema = ArrayEMA(params, 0.5)
    params["new"] = np.zeros(4)  # the caller edits its dict afterwards
    assert set(ema.get()) == {"w", "b"}
    ema.update({"b": np.ones(1), "w": np.ones(2)})
    assert ema.get()["b"].tolist() == [0.5]


@pytest.mark.parametrize("mode", ["raise", "skip", "propagate"])
def test_nonfinite_modes(mode):
    ema = ArrayEMA([np.zeros(2), np.zeros(1)], 0.5, nonfinite=mode)
    ema.update([np.ones(2), np.ones(1)])
    bad = [np.array([1.0, np.inf]), np.ones(1)]
    if mode == "raise":
        with pytest.raises(polyak.NonFiniteError, match=r"\[0\]") as info:
            ema.update(bad)
        assert info.value.names == ["[0]"] and ema.step == 1
    else:
        ema.update(bad)
        assert ema.step == 2
    if mode == "skip":
        assert ema.skipped_updates == 1 and ema.get()[0].tolist() == [0.5, 0.5]
    if mode == "propagate":
        with pytest.warns(UserWarning, match=r"holds inf/nan at \['\[0\]'\]"):
            ema.get()


def test_load_checks_every_field_and_changes_nothing_on_failure():
    ema = ArrayEMA([np.zeros(2), np.zeros(1)], {"a": 0.5, "b": 0.9})
    ema.update([np.ones(2), np.ones(1)])
    state = ema.state_dict()
    before = ema.state_dict()
    spoilers = [
        lambda s: s["averages"].__setitem__("b", s["averages"]["b"][:1]),
        lambda s: s["averages"]["b"].__setitem__(0, np.array([1.0, np.nan])),
        lambda s: s["averages"]["b"].__setitem__(0, np.array([1, 2])),
        lambda s: s["leftover"].__setitem__("b", 2.0),
        lambda s: s.pop("leftover"),
        lambda s: s["timeline"].__setitem__("last_decays", [0.5]),
        lambda s: s["timeline"]["schedules"]["b"].__setitem__("kind", "warmup"),
    ]
    for spoil in spoilers:
        bad = {**state, "averages": {k: list(v) for k, v in state["averages"].items()}}
        bad["leftover"] = dict(state["leftover"])
        bad["timeline"] = {
            **state["timeline"],
            "schedules": {k: dict(v) for k, v in state["timeline"]["schedules"].items()},
        }
        spoil(bad)
        with pytest.raises((ValueError, TypeError)):
            ema.load_state_dict(bad)
        now = ema.state_dict()
        assert now["timeline"] == before["timeline"] and now["leftover"] == before["leftover"]
        for name in ("a", "b"):
            for x, y in zip(now["averages"][name], before["averages"][name]):
                assert np.array_equal(x, y)
    with pytest.raises(TypeError, match="must be a mapping"):
        ema.load_state_dict([1])


def test_the_skipped_count_is_saved_and_checked():
    ema = ArrayEMA(np.zeros(2), 0.5, nonfinite="skip")
    for x in (1.0, np.nan, 2.0):
        ema.update(np.full(2, x))
    state = ema.state_dict()
    assert state["skipped_updates"] == 1
    back = ArrayEMA(np.zeros(2), 0.5, nonfinite="skip")
    back.load_state_dict(state)
    assert back.skipped_updates == 1 and back.get().tolist() == ema.get().tolist()
    old = {k: v for k, v in state.items() if k != "skipped_updates"}  # saved before the field
    back.load_state_dict(old)
    assert back.skipped_updates == 0
    for bad in (-1, 4, 0.5, True):
        with pytest.raises(ValueError, match="skipped_updates must be an integer from 0 to"):
            back.load_state_dict({**state, "skipped_updates": bad})
    assert back.skipped_updates == 0 and back.step == 3
