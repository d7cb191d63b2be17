"""ema_update / ema_update_: NumPy and torch, containers, bad input, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import polyak
import reference

finite = st.floats(-1e6, 1e6, allow_nan=False, width=64)
decays = st.floats(0.0, 1.0, allow_nan=False)


@given(
    arrays(np.float64, st.integers(1, 20), elements=finite),
    arrays(np.float64, st.integers(1, 20), elements=finite),
    decays,
)
def test_numpy_matches_reference(a, v, d):
    if a.shape != v.shape:
        v = np.resize(v, a.shape)
    expected = reference.ema([v], [d], a)
    out = polyak.ema_update(a, v, d)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-9)
    polyak.ema_update_(a, v, d)
    np.testing.assert_array_equal(a, out)


@given(
    arrays(np.float32, 17, elements=st.floats(-1e3, 1e3, width=32, allow_nan=False)),
    st.floats(-1e3, 1e3, width=32, allow_nan=False),
    decays,
)
def test_constant_input_is_a_fixed_point(x, c, d):
    avg = np.full_like(x, c)
    polyak.ema_update_(avg, np.full_like(x, c), d)
    assert (avg == np.float32(c)).all()
    t = torch.full((17,), c)
    polyak.ema_update_(t, torch.full((17,), c), d)
    assert (t == c).all()


@settings(max_examples=50)
@given(
    st.lists(
        arrays(np.float32, 8, elements=st.floats(-100, 100, width=32)), min_size=1, max_size=20
    ),
    st.lists(decays, min_size=20, max_size=20),
)
def test_average_stays_within_seen_range(values, ds):
    init = values[0].copy()
    lo, hi = init.copy(), init.copy()
    avg_np, avg_t = init.copy(), torch.from_numpy(init.copy())
    for v, d in zip(values, ds):
        lo, hi = np.minimum(lo, v), np.maximum(hi, v)
        polyak.ema_update_(avg_np, v, d)
        polyak.ema_update_(avg_t, torch.from_numpy(v), d)
        for avg in (avg_np, avg_t.numpy()):
            assert (avg >= lo).all() and (avg <= hi).all()


@given(
    arrays(np.float32, 9, elements=st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False)),
    arrays(np.float32, 9, elements=st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False)),
)
def test_decay_zero_copies_and_one_freezes(a, v):
    for make in (np.array, torch.tensor):
        avg = make(a.copy())
        polyak.ema_update_(avg, make(v), 0.0)
        np.testing.assert_array_equal(np.asarray(avg), v)
        avg = make(a.copy())
        polyak.ema_update_(avg, make(v), 1.0)
        np.testing.assert_array_equal(np.asarray(avg), a)


def test_torch_matches_numpy_and_reference_fp32():
    rng = np.random.default_rng(0)
    a, v = rng.normal(size=1000).astype(np.float32), rng.normal(size=1000).astype(np.float32)
    expected = reference.ema([v], [0.97], a)
    t = torch.from_numpy(a.copy())
    polyak.ema_update_(t, torch.from_numpy(v), 0.97)
    np.testing.assert_allclose(t.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(polyak.ema_update(a, v, 0.97), expected, rtol=0, atol=1e-6)


def test_containers_lists_tuples_dicts_nested():
    avg = {"w": [np.zeros(2), np.zeros(3)], "b": (torch.zeros(2),)}
    avg["b"] = (np.zeros(2),)
    val = {"w": [np.ones(2), np.full(3, 2.0)], "b": (np.full(2, 4.0),)}
    out = polyak.ema_update(avg, val, 0.5)
    assert isinstance(out, dict) and isinstance(out["w"], list) and isinstance(out["b"], tuple)
    np.testing.assert_array_equal(out["w"][1], np.ones(3))
    np.testing.assert_array_equal(avg["w"][1], np.zeros(3))  # out of place: untouched
    res = polyak.ema_update_(avg, val, 0.5)
    assert res is avg
    np.testing.assert_array_equal(avg["b"][0], np.full(2, 2.0))


def test_torch_lists_mixed_dtype_and_out_of_place_promotes():
    avg = [torch.zeros(4), torch.zeros(3, dtype=torch.float64)]
    val = [torch.ones(4, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float64)]
    polyak.ema_update_(avg, val, 0.75)
    assert avg[0].dtype == torch.float32 and torch.equal(avg[0], torch.full((4,), 0.25))
    out = polyak.ema_update(torch.zeros(2), torch.ones(2, dtype=torch.float64), 0.5)
    assert out.dtype == torch.float64
    out = polyak.ema_update(np.zeros(2, np.float32), np.ones(2), 0.5)
    assert out.dtype == np.float64


def test_flat_seed_problem_vector():
    avg, w = np.zeros(5), np.arange(5.0)
    for _ in range(3):
        avg = polyak.ema_update(avg, w, 0.9)
    np.testing.assert_allclose(avg, (1 - 0.9**3) * w)


def test_requires_grad_leaf_tensor_updates_in_place():
    avg = torch.zeros(3, requires_grad=True)
    polyak.ema_update_(avg, torch.ones(3), 0.5)
    assert torch.equal(avg.detach(), torch.full((3,), 0.5))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_decay_out_of_range_is_named(bad):
    with pytest.raises(ValueError, match="decay must be in"):
        polyak.ema_update(np.zeros(2), np.ones(2), bad)


@pytest.mark.parametrize("bad", [True, "0.9", None, [0.9]])
def test_decay_wrong_type(bad):
    with pytest.raises(TypeError, match="decay"):
        polyak.ema_update(np.zeros(2), np.ones(2), bad)


def test_bad_input_is_named_and_leaves_avg_untouched():
    avg = [np.zeros(2), np.zeros(3)]
    with pytest.raises(ValueError, match=r"\[1\].*\(3,\).*\(4,\)"):
        polyak.ema_update_(avg, [np.ones(2), np.ones(4)], 0.5)
    assert not avg[0].any()  # the first, valid pair was not written either
    with pytest.raises(ValueError, match="leaves differ from avg's: missing \\[\"\\['b'\\]\"\\]"):
        polyak.ema_update({"a": np.zeros(1), "b": np.zeros(1)}, {"a": np.ones(1)}, 0.5)
    with pytest.raises(ValueError, match="missing"):
        polyak.ema_update([np.zeros(1)] * 2, [np.zeros(1)], 0.5)
    with pytest.raises(TypeError, match="cannot mix frameworks"):
        polyak.ema_update(np.zeros(2), torch.zeros(2), 0.5)
    with pytest.raises(TypeError, match="int64.*only floats"):
        polyak.ema_update(np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64), 0.5)
    with pytest.raises(TypeError, match="only floats"):
        polyak.ema_update_(torch.zeros(2), torch.zeros(2, dtype=torch.long), 0.5)
    with pytest.raises(TypeError, match="got float"):
        polyak.ema_update([1.0], [2.0], 0.5)
    ro = np.zeros(2)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        polyak.ema_update_(ro, np.ones(2), 0.5)


def test_import_polyak_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, polyak; polyak.ArrayEMA; polyak.schedules; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("make", [np.array, torch.tensor])
def test_decay_one_and_zero_are_exact_for_inf_and_nan(make):
    avg = make([1.0, 2.0, 3.0])
    bad = make([float("inf"), float("nan"), -float("inf")])
    polyak.ema_update_(avg, bad, decay=1.0)
    assert list(avg.tolist()) == [1.0, 2.0, 3.0]  # untouched, not 0 * inf = nan
    polyak.ema_update_(avg, bad, decay=0.0)
    out = avg.tolist()
    assert out[0] == float("inf") and out[1] != out[1] and out[2] == -float("inf")  # a copy
    assert polyak.ema_update(make([5.0]), make([float("nan")]), 1.0).tolist() == [5.0]


def test_numpy_float16_does_not_overflow_where_torch_does_not():
    a = np.array([-6e4], dtype=np.float16)
    polyak.ema_update_(a, np.array([6e4], dtype=np.float16), 0.5)
    t = torch.tensor([-6e4], dtype=torch.float16)
    polyak.ema_update_(t, torch.tensor([6e4], dtype=torch.float16), 0.5)
    assert a[0] == 0.0 and t.item() == 0.0


def test_dicts_with_the_same_keys_in_another_order_match_by_key():
    avg = {"a": np.zeros(1), "b": np.zeros(2)}
    polyak.ema_update_(avg, {"b": np.ones(2), "a": np.full(1, 2.0)}, 0.5)
    assert avg["a"].tolist() == [1.0] and avg["b"].tolist() == [0.5, 0.5]


@pytest.mark.parametrize(
    "bad",
    [
        lambda: np.zeros(3)[np.newaxis].repeat(1, 0)[0].view(),  # writable (control, below)
        lambda: np.broadcast_to(np.zeros(1), (3,)),  # read-only view
        lambda: torch.zeros(1).expand(3),  # elements that share memory
    ],
)
def test_a_later_leaf_that_cannot_be_written_is_found_before_the_first_write(bad):
    leaf = bad()
    first = np.zeros(3) if isinstance(leaf, np.ndarray) else torch.zeros(3)
    avg = [first, leaf]
    value = [np.ones(3), np.ones(3)] if isinstance(leaf, np.ndarray) else [torch.ones(3)] * 2
    writable = isinstance(leaf, np.ndarray) and leaf.flags.writeable
    if writable:
        polyak.ema_update_(avg, value, 0.5)
        assert first.tolist() == [0.5] * 3
        return
    with pytest.raises(ValueError, match=r"at \[1\]"):
        polyak.ema_update_(avg, value, 0.5)
    assert first.tolist() == [0.0] * 3


def test_complex_value_into_a_real_average_is_refused():
    with pytest.raises(TypeError, match="imaginary part would be dropped"):
        polyak.ema_update_([np.zeros(2), np.zeros(2)], [np.ones(2), np.ones(2) * 1j], 0.5)
    with pytest.raises(TypeError, match="imaginary"):
        polyak.ema_update_(torch.zeros(2), torch.ones(2, dtype=torch.cfloat), 0.5)


_BIG32 = float(np.finfo(np.float32).max)


@settings(max_examples=200)
@given(
    arrays(np.float32, 7, elements=st.floats(-_BIG32, _BIG32, width=32)),
    arrays(np.float32, 7, elements=st.floats(-_BIG32, _BIG32, width=32)),
    st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
)
def test_numpy_lerp_of_finite_inputs_near_the_dtype_max_is_finite_and_correct(a, v, d):
    """``value - avg`` overflows float32 for (-3e38, 3e38); the result must not."""
    expected = reference.ema([v], [d], a)  # float64: no overflow
    out = polyak.ema_update(a, v, d)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    scale = np.maximum(np.abs(a.astype(np.float64)), np.abs(v.astype(np.float64)))
    np.testing.assert_array_less(np.abs(out - expected), 4e-7 * scale + 1e-45)
    polyak.ema_update_(a, v, d)
    np.testing.assert_array_equal(a, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64])
def test_numpy_lerp_overflow_cases_named_in_the_issue(dtype):
    big = float(np.finfo(dtype).max)
    avg = np.array([-0.9 * big, 0.9 * big, -big, 1.0, np.nan, np.inf], dtype)
    value = np.array([0.9 * big, -0.9 * big, big, 2.0, 1.0, 1.0], dtype)
    expected = [0.0, 0.0, 0.0, 1.5]
    polyak.ema_update_(avg, value, 0.5)
    np.testing.assert_allclose(avg[:4], expected, atol=1e-6 * big)
    assert np.isnan(avg[4]) and not np.isfinite(avg[5])  # inf/nan inputs still propagate
    for d in (0.25, 0.75, 1e-7, 1 - 1e-7):
        a, v = np.array([-0.8 * big], dtype), np.array([0.8 * big], dtype)
        with np.errstate(all="raise"):  # the caller's error state does not leak in
            out = polyak.ema_update(a, v, d)
        exact = d * -0.8 + (1 - d) * 0.8
        np.testing.assert_allclose(out / big, [exact], rtol=1e-5, atol=1e-6)


def test_torch_lerp_overflow_is_torchs_own_and_documented():
    """The torch path is ``torch.lerp`` (also what ``polyak.EMA`` runs), which overflows for
    finite float32 inputs whose difference passes 3.4e38; checking for it would cost a second
    read of both inputs (more than the update itself), so it is documented, not fixed. float16
    and bfloat16 compute in float32 and do not overflow."""
    avg = torch.tensor([-3e38, 1.0])
    polyak.ema_update_(avg, torch.tensor([3e38, 2.0]), 0.5)
    assert torch.equal(avg, torch.lerp(torch.tensor([-3e38, 1.0]), torch.tensor([3e38, 2.0]), 0.5))
    assert avg[0] == -float("inf") and avg[1] == 1.5
    half = torch.tensor([-6e4], dtype=torch.float16)
    polyak.ema_update_(half, torch.tensor([6e4], dtype=torch.float16), 0.5)
    assert half.item() == 0.0
