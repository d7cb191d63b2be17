"""Tests for polyak.metrics: against scikit-learn / scipy where they have the metric, against naive
Python loops written here where they do not, and for every rejected input."""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import accuracy_score, log_loss, mean_absolute_error, mean_squared_error

import polyak.metrics as M

FAST = settings(max_examples=40, deadline=None, database=None)
SEEDS = [0, 1, 2]


# --------------------------------------------------------------------------- naive references


def naive_top1(row):
    best = 0
    for k in range(len(row)):
        if row[k] > row[best]:  # strict: the first maximum wins a tie
            best = k
    return best


def naive_bins(probs, labels, n_bins, binning):
    """(count, mean confidence, accuracy) per bin, by explicit loops."""
    probs = [list(map(float, r)) for r in np.asarray(probs)]
    conf = [max(r) for r in probs]
    correct = [naive_top1(r) == int(y) for r, y in zip(probs, labels, strict=True)]
    members: list[list[int]] = [[] for _ in range(n_bins)]
    if binning == "equal_width":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        for i, c in enumerate(conf):
            for b in range(n_bins):
                if (b == 0 and c <= edges[1]) or edges[b] < c <= edges[b + 1]:
                    members[b].append(i)
                    break
    else:
        order = sorted(range(len(conf)), key=lambda i: conf[i])  # Python's sort is stable
        members = [list(g) for g in np.array_split(order, n_bins)]
    out = []
    for mem in members:
        n = len(mem)
        out.append(
            (
                n,
                sum(conf[i] for i in mem) / n if n else math.nan,
                sum(correct[i] for i in mem) / n if n else math.nan,
            )
        )
    return out


def naive_ece(probs, labels, n_bins, binning):
    bins = naive_bins(probs, labels, n_bins, binning)
    total = sum(n for n, _, _ in bins)
    return sum(n / total * abs(a - c) for n, c, a in bins if n)


def naive_js(p, q):
    out = []
    for pr, qr in zip(np.atleast_2d(p), np.atleast_2d(q), strict=True):
        kl_p = kl_q = 0.0
        for a, b in zip(pr, qr, strict=True):
            m = (a + b) / 2
            if a > 0:
                kl_p += a * math.log(a / m)
            if b > 0:
                kl_q += b * math.log(b / m)
        out.append(0.5 * kl_p + 0.5 * kl_q)
    return sum(out) / len(out)


def random_probs(rng, n, c, scale=3.0):
    return scipy.special.softmax(rng.normal(scale=scale, size=(n, c)), axis=1)


shapes_nc = st.tuples(st.integers(1, 40), st.integers(1, 6))


@st.composite
def classification(draw, min_c=1):
    n, c = draw(st.integers(1, 40)), draw(st.integers(min_c, 6))
    logits = draw(hnp.arrays(np.float64, (n, c), elements=st.floats(-20, 20)))
    labels = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    return logits, labels


# --------------------------------------------------------------------------- softmax


@FAST
@given(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3), elements=st.floats(-1e3, 1e3)),
    st.sampled_from([0, -1]),
)
def test_softmax_and_log_softmax_match_scipy(x, axis):
    want = scipy.special.softmax(x, axis=axis)
    np.testing.assert_allclose(M.softmax(x, axis=axis), want, rtol=1e-10, atol=1e-300)  # subnormals
    want = scipy.special.log_softmax(x, axis=axis)
    np.testing.assert_allclose(M.log_softmax(x, axis=axis), want, rtol=1e-12, atol=1e-12)


def test_huge_logits_do_not_overflow():
    x = np.array([[1e300, -1e300, 0.0], [1e308, -1e308, 5.0], [-np.inf, 3.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p, lp = M.softmax(x), M.log_softmax(x)
        loss = M.nll_from_logits([[1e30, 0.0]], [1])
    np.testing.assert_array_equal(p, [[1, 0, 0], [1, 0, 0], [0, 0.5, 0.5]])
    np.testing.assert_array_equal(lp[0], [0.0, -2e300, -1e300])
    assert lp[2, 0] == -np.inf and lp[2, 1] == pytest.approx(-math.log(2))
    assert loss == 1e30
    assert M.nll_from_logits([[1e30, 0.0]], [0]) == 0.0


def test_softmax_returns_float64_and_keeps_empty_shape():
    assert M.softmax(np.zeros(3, dtype=np.float32)).dtype == np.float64
    assert M.softmax(np.zeros((0, 4))).shape == (0, 4)


# --------------------------------------------------------------------------- accuracy / nll


@FAST
@given(classification())
def test_accuracy_matches_sklearn(data):
    logits, labels = data
    want = accuracy_score(labels, np.argmax(logits, axis=1))
    assert M.accuracy(logits, labels) == pytest.approx(want, abs=1e-15)
    assert M.accuracy(np.argmax(logits, axis=1), labels) == pytest.approx(want, abs=1e-15)


def test_accuracy_ties_take_the_first_maximum():
    assert M.accuracy([[0.5, 0.5], [0.2, 0.4]], [0, 1]) == 1.0
    assert M.accuracy([[0.4, 0.3, 0.3], [0.3, 0.35, 0.35]], [1, 2]) == 0.0


@FAST
@given(classification(min_c=2))
def test_nll_matches_sklearn_log_loss(data):
    logits, labels = data
    c = logits.shape[1]
    probs = scipy.special.softmax(logits / 4, axis=1)  # entries >= e^-10: never clipped
    want = log_loss(labels, probs, labels=list(range(c)))
    assert M.nll(probs, labels) == pytest.approx(want, rel=1e-10)
    assert M.nll_from_logits(logits / 4, labels) == pytest.approx(want, rel=1e-10)


def test_nll_clips_at_eps():
    assert M.nll([[1.0, 0.0]], [1]) == pytest.approx(-math.log(1e-12))
    assert M.nll([[1.0, 0.0]], [1], eps=1e-3) == pytest.approx(-math.log(1e-3))
    assert M.nll([[0.25, 0.75]], [0], eps=0.5) == pytest.approx(-math.log(0.5))


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("binning", ["equal_width", "equal_mass"])
@pytest.mark.parametrize("n_bins", [1, 7, 15, 100])
def test_ece_and_bins_match_naive_loops(seed, binning, n_bins):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 300)), int(rng.integers(2, 8))
    probs = random_probs(rng, n, c)
    probs[: n // 3] = np.round(probs[: n // 3], 1)  # many exact ties in confidence
    probs /= probs.sum(axis=1, keepdims=True)
    labels = rng.integers(0, c, size=n)
    want = naive_bins(probs, labels, n_bins, binning)
    got = M.calibration_bins(probs, labels, n_bins=n_bins, binning=binning)
    np.testing.assert_array_equal(got.count, [w[0] for w in want])
    np.testing.assert_allclose(got.confidence, [w[1] for w in want], rtol=1e-12)
    np.testing.assert_allclose(got.accuracy, [w[2] for w in want], rtol=1e-12)
    assert M.ece(probs, labels, n_bins, binning) == pytest.approx(
        naive_ece(probs, labels, n_bins, binning), rel=1e-12, abs=1e-15
    )


@FAST
@given(classification(), st.integers(1, 20), st.sampled_from(["equal_width", "equal_mass"]))
def test_ece_matches_naive_loop_property(data, n_bins, binning):
    logits, labels = data
    probs = scipy.special.softmax(logits, axis=1)
    got = M.ece(probs, labels, n_bins=n_bins, binning=binning)
    assert got == pytest.approx(naive_ece(probs, labels, n_bins, binning), rel=1e-9, abs=1e-12)
    assert 0.0 <= got <= 1.0


def test_equal_width_edge_values_go_to_the_lower_bin():
    # n_bins=4 has exact binary edges 0, .25, .5, .75, 1: each row sits exactly on an edge.
    probs = [[0.25] * 4, [0.5, 0.5, 0, 0], [0.75, 0.25, 0, 0], [1.0, 0, 0, 0], [0.0, 1.0, 0, 0]]
    bins = M.calibration_bins(probs, [0, 1, 0, 0, 0], n_bins=4)
    np.testing.assert_array_equal(bins.edges, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_array_equal(bins.count, [1, 1, 1, 2])
    np.testing.assert_array_equal(bins.accuracy, [1.0, 0.0, 1.0, 0.5])  # [.5,.5] predicts 0
    np.testing.assert_array_equal(bins.confidence, [0.25, 0.5, 0.75, 1.0])
    # ECE = (|1 - .25| + |0 - .5| + |1 - .75| + 2 |.5 - 1|) / 5
    assert M.ece(probs, [0, 1, 0, 0, 0], n_bins=4) == pytest.approx(0.5)


def test_equal_mass_splits_ties_by_input_order():
    probs = [[0.6, 0.4]] * 5
    bins = M.calibration_bins(probs, [0, 0, 1, 1, 1], n_bins=2, binning="equal_mass")
    np.testing.assert_array_equal(bins.count, [3, 2])  # array_split: first bin gets the extra
    np.testing.assert_allclose(bins.accuracy, [2 / 3, 0.0])
    np.testing.assert_array_equal(bins.edges, [0.6, 0.6, 0.6])
    probs = [[0.9, 0.1], [0.7, 0.3], [0.8, 0.2], [0.6, 0.4]]
    bins = M.calibration_bins(probs, [0, 1, 0, 0], n_bins=3, binning="equal_mass")
    np.testing.assert_array_equal(bins.count, [2, 1, 1])
    np.testing.assert_allclose(bins.confidence, [0.65, 0.8, 0.9])
    np.testing.assert_allclose(bins.accuracy, [0.5, 1.0, 1.0])
    np.testing.assert_array_equal(bins.edges, [0.6, 0.8, 0.9, 0.9])


def test_more_bins_than_samples_leaves_empty_bins():
    probs, labels = [[0.9, 0.1], [0.3, 0.7]], [0, 0]
    for binning in ("equal_width", "equal_mass"):
        bins = M.calibration_bins(probs, labels, n_bins=5, binning=binning)
        assert bins.count.sum() == 2 and (bins.count == 0).sum() == 3
        assert np.isnan(bins.confidence[bins.count == 0]).all()
        assert np.all(np.diff(bins.edges) >= 0)
        assert M.ece(probs, labels, 5, binning) == pytest.approx((0.1 + 0.7) / 2)


def _binary(rng, n, true_prob_of):
    p1 = rng.uniform(0.0, 1.0, size=n)
    probs = np.stack([1 - p1, p1], axis=1)
    conf = probs.max(axis=1)
    correct = rng.uniform(size=n) < true_prob_of(conf)
    labels = np.where(correct, probs.argmax(axis=1), 1 - probs.argmax(axis=1))
    return probs, labels


# Sampling error of a calibrated model: E|acc_b - conf_b| ~ sqrt(2/pi) * sqrt(c(1-c)/n_b) per bin,
# about 0.002 with ~13k samples per width bin and 0.007 with 2000 per mass bin (N = 200k).
@pytest.mark.parametrize(
    ("binning", "n_bins", "noise"), [("equal_width", 15, 0.005), ("equal_mass", 100, 0.01)]
)
def test_calibrated_gives_ece_near_zero_and_overconfident_a_known_gap(binning, n_bins, noise):
    rng = np.random.default_rng(1234)
    probs, labels = _binary(rng, 200_000, lambda c: c)
    assert M.ece(probs, labels, n_bins, binning) < noise
    probs, labels = _binary(rng, 200_000, lambda c: c - 0.1)  # 10 points overconfident
    assert M.ece(probs, labels, n_bins, binning) == pytest.approx(0.1, abs=0.005)


# --------------------------------------------------------------------------- agreement / JS


@FAST
@given(st.integers(1, 50), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_agreement_and_churn_match_naive_loop(n, c, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, c)), rng.normal(size=(n, c))
    b[: n // 2] = a[: n // 2]  # guarantee some agreement
    want = sum(naive_top1(x) == naive_top1(y) for x, y in zip(a, b, strict=True)) / n
    assert M.agreement(a, b) == pytest.approx(want, abs=1e-15)
    assert M.churn(a, b) == pytest.approx(1 - want, abs=1e-15)
    ib = np.array([naive_top1(y) for y in b])
    assert M.agreement(a, ib) == M.agreement(ib, a) == M.agreement(a, b)


def test_agreement_hand_values():
    assert M.agreement([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert M.churn([0, 1, 2, 3], [1, 1, 0, 3]) == 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_js_matches_naive_loop_and_scipy(seed):
    rng = np.random.default_rng(seed)
    p, q = random_probs(rng, 30, 5), random_probs(rng, 30, 5)
    p[:5, 0], q[:5, 1] = 0.0, 0.0  # exact zeros: 0 log 0 = 0
    p /= p.sum(axis=1, keepdims=True)
    q /= q.sum(axis=1, keepdims=True)
    want = naive_js(p, q)
    assert M.js_divergence(p, q) == pytest.approx(want, rel=1e-12)
    scipy_sq = np.mean(jensenshannon(p, q, axis=1) ** 2)  # scipy gives the square root
    assert M.js_divergence(p, q) == pytest.approx(scipy_sq, rel=1e-9)
    base2 = np.mean(jensenshannon(p, q, axis=1, base=2) ** 2)
    assert M.js_divergence(p, q, base=2) == pytest.approx(base2, rel=1e-9)


@FAST
@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_js_properties(c, seed):
    rng = np.random.default_rng(seed)
    p, q = random_probs(rng, 4, c), random_probs(rng, 4, c)
    assert M.js_divergence(p, q) == pytest.approx(M.js_divergence(q, p), abs=1e-15)
    assert M.js_divergence(p, p) == 0.0
    assert 0.0 <= M.js_divergence(p, q, base=2) <= 1.0
    assert M.js_divergence(p[0], q[0]) == pytest.approx(naive_js(p[:1], q[:1]), abs=1e-14)


def test_js_disjoint_supports_is_log2():
    assert M.js_divergence([[1, 0, 0]], [[0, 0.5, 0.5]]) == pytest.approx(math.log(2))
    assert M.js_divergence([[1, 0, 0]], [[0, 0.5, 0.5]], base=2) == pytest.approx(1.0)


# --------------------------------------------------------------------------- regression


@FAST
@given(
    hnp.array_shapes(min_dims=1, max_dims=2, max_side=20).flatmap(
        lambda s: st.tuples(
            hnp.arrays(np.float64, s, elements=st.floats(-1e6, 1e6)),
            hnp.arrays(np.float64, s, elements=st.floats(-1e6, 1e6)),
        )
    )
)
def test_rmse_mae_match_sklearn(pair):
    pred, target = pair
    p2, t2 = pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1)
    want_rmse = math.sqrt(mean_squared_error(t2, p2))
    assert M.rmse(pred, target) == pytest.approx(want_rmse, rel=1e-9, abs=1e-12)
    assert M.mae(pred, target) == pytest.approx(mean_absolute_error(t2, p2), rel=1e-9, abs=1e-12)


def test_rmse_hand_values_and_no_overflow():
    assert M.rmse([3.0, -3.0], [0.0, 1.0]) == pytest.approx(math.sqrt(12.5))
    assert M.mae([3.0, -3.0], [0.0, 1.0]) == 3.5
    assert M.rmse([1e200, 0.0], [0.0, 0.0]) == pytest.approx(1e200 / math.sqrt(2))
    assert M.rmse([1.0, 2.0], [1.0, 2.0]) == 0.0


# --------------------------------------------------------------------------- inputs


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    want = M.nll_from_logits(logits.detach().numpy(), labels.numpy())
    assert M.nll_from_logits(logits, labels) == pytest.approx(want)
    assert M.nll_from_logits(logits, labels) == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6
    )
    probs = torch.softmax(logits, 1)
    assert M.accuracy(logits.to(torch.bfloat16), labels) == 0.5
    assert M.ece(probs, labels, n_bins=10) == pytest.approx(
        M.ece(probs.detach().numpy(), [0, 1], 10)
    )
    assert M.rmse(torch.ones(3), torch.zeros(3)) == 1.0


def test_docstring_examples_hold():
    result = doctest.testmod(M, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 13 and result.failed == 0


def test_probability_sum_tolerance_is_1e_3():
    assert M.nll([[0.5, 0.5009]], [0]) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match=r"row 0 sums to 1\.0011"):
        M.nll([[0.5, 0.5011]], [0])


P3 = [[0.2, 0.3, 0.5]] * 5
Y5 = [0, 1, 2, 0, 1]
BAD = [
    # (function, args, kwargs, exception, message regex)
    (M.accuracy, (P3, [0, 1, 2, 0]), {}, ValueError, r"labels shape \(4,\).*\(5, 3\)"),
    (M.accuracy, (np.zeros((0, 3)), []), {}, ValueError, r"empty.*\(0, 3\)"),
    (M.accuracy, (np.zeros((2, 0)), [0, 0]), {}, ValueError, r"empty.*\(2, 0\)"),
    (M.accuracy, (P3, [0, 1, 3, 0, 1]), {}, ValueError, r"labels\[2\] = 3 .*0\.\.2"),
    (M.accuracy, (P3, [0, -1, 2, 0, 1]), {}, ValueError, r"labels\[1\] = -1"),
    (M.accuracy, (P3, [0.0, 1.0, 2.0, 0.0, 1.0]), {}, TypeError, r"labels.*integer.*float64"),
    (M.accuracy, ([1, 0], [True, False]), {}, TypeError, r"labels.*bool"),
    (M.accuracy, ([0.2, 0.9], [0, 1]), {}, TypeError, r"1-D pred.*float64"),
    (M.accuracy, (np.zeros((2, 2, 2)), [0, 1]), {}, ValueError, r"pred.*\(2, 2, 2\)"),
    (M.accuracy, ([[np.nan, 1.0]], [0]), {}, ValueError, r"pred contains NaN at index \(0, 0\)"),
    (M.accuracy, ([["a", "b"]], [0]), {}, TypeError, r"pred.*<U1"),
    (M.accuracy, (np.array([], dtype=int), []), {}, ValueError, r"pred is empty"),
    (M.nll, ([[0.5, 0.4]], [0]), {}, ValueError, r"row 0 sums to 0\.9.*\(1, 2\)"),
    (M.nll, ([[1.1, -0.1]], [0]), {}, ValueError, r"probs\[\(0, 1\)\] = -0\.1"),
    (M.nll, ([[np.inf, 0.0]], [0]), {}, ValueError, r"probs\[\(0, 0\)\] = inf"),
    (M.nll, ([0.5, 0.5], [0]), {}, ValueError, r"probs must be 2-D, got shape \(2,\)"),
    (M.nll, (P3, Y5), {"eps": 0.0}, ValueError, r"eps must be in \(0, 1\), got 0\.0"),
    (M.nll, (P3, Y5), {"eps": 1.5}, ValueError, r"got 1\.5"),
    (M.nll, (P3, [[0]] * 5), {}, ValueError, r"labels shape \(5, 1\)"),
    (M.nll_from_logits, ([[0.0, 1.0]], [2]), {}, ValueError, r"labels\[0\] = 2.*\(1, 2\)"),
    (M.nll_from_logits, ([[0.0, np.inf]], [0]), {}, ValueError, r"\+inf"),
    (M.calibration_bins, (P3, Y5), {"n_bins": 0}, ValueError, r"n_bins must be >= 1, got 0"),
    (M.ece, (P3, Y5), {"n_bins": -3}, ValueError, r"got -3"),
    (M.ece, (P3, Y5), {"n_bins": 2.5}, TypeError, r"n_bins must be an int, got 2\.5"),
    (M.ece, (P3, Y5), {"n_bins": True}, TypeError, r"got True"),
    (M.ece, (P3, Y5), {"binning": "equal"}, ValueError, r"binning.*'equal'"),
    (M.ece, (P3, Y5), {"binning": None}, ValueError, r"binning.*None"),
    (M.ece, ([[0.3, 0.3]], [0]), {}, ValueError, r"sums to 0\.6"),
    (M.ece, (P3, Y5[:3]), {}, ValueError, r"labels shape \(3,\).*\(5, 3\)"),
    (M.agreement, ([0, 1, 2], [0, 1]), {}, ValueError, r"pred_a shape \(3,\).*pred_b shape \(2,\)"),
    (M.agreement, (np.zeros((2, 3)), np.zeros((2, 4))), {}, ValueError, r"\(2, 3\).*\(2, 4\)"),
    (M.churn, (np.zeros((0, 3)), np.zeros((0, 3))), {}, ValueError, r"pred_a is empty"),
    (M.churn, ([0.5], [1]), {}, TypeError, r"pred_a"),
    (M.js_divergence, ([[1.0, 0.0]], [[1.0, 0.0, 0.0]]), {}, ValueError, r"\(1, 2\).*\(1, 3\)"),
    (M.js_divergence, ([[0.5, 0.6]], [[1.0, 0.0]]), {}, ValueError, r"p rows.*row 0 sums to 1\.1"),
    (M.js_divergence, ([[1.0, 0.0]], [[0.1, 0.1]]), {}, ValueError, r"q rows.*sums to 0\.2"),
    (M.js_divergence, ([1.0, 0.0], [0.0, 1.0]), {"base": 1}, ValueError, r"base.*got 1"),
    (M.js_divergence, ([1.0, 0.0], [0.0, 1.0]), {"base": -2.0}, ValueError, r"got -2\.0"),
    (M.js_divergence, ([1.0, 0.0], [0.0, 1.0]), {"base": "2"}, TypeError, r"base.*'2'"),
    (M.js_divergence, (np.zeros((0, 2)), np.zeros((0, 2))), {}, ValueError, r"p is empty"),
    (M.rmse, ([1.0, 2.0], [1.0, 2.0, 3.0]), {}, ValueError, r"\(2,\).*\(3,\)"),
    (M.mae, (np.zeros((2, 3)), np.zeros((3, 2))), {}, ValueError, r"\(2, 3\).*\(3, 2\)"),
    (M.rmse, ([], []), {}, ValueError, r"empty.*\(0,\)"),
    (M.mae, ([1.0, np.nan], [1.0, 2.0]), {}, ValueError, r"pred contains NaN at index \(1,\)"),
    (M.rmse, ([1.0], [np.inf]), {}, ValueError, r"finite"),
    (M.mae, ([1 + 2j], [1.0]), {}, TypeError, r"complex128"),
    (M.rmse, ([True], [False]), {}, TypeError, r"pred.*bool"),
    (M.accuracy, ([[True, False]], [0]), {}, TypeError, r"pred.*bool"),
    (M.softmax, ([1.0, np.nan],), {}, ValueError, r"NaN"),
    (M.softmax, ([1.0, np.inf],), {}, ValueError, r"\+inf"),
    (M.log_softmax, ([[0.0, 1.0], [-np.inf, -np.inf]],), {}, ValueError, r"all -inf.*\(2, 2\)"),
]


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "exc", "pattern"),
    BAD,
    ids=[f"{i}-{b[0].__name__}" for i, b in enumerate(BAD)],
)
def test_bad_input_raises_naming_it(fn, args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


def test_valid_versions_of_the_bad_inputs_pass():
    """Guards the table above: each call differs from a valid one only in the named defect."""
    assert M.accuracy(P3, Y5) == pytest.approx(0.2)
    assert M.nll(P3, Y5, eps=0.5) == pytest.approx(-np.mean(np.log([0.5, 0.5, 0.5, 0.5, 0.5])))
    assert M.ece(P3, Y5, n_bins=np.int64(3)) == pytest.approx(0.3)
    assert M.js_divergence([1.0, 0.0], [0.0, 1.0], base=np.float32(2)) == pytest.approx(1.0)
    assert M.churn(np.zeros((2, 3)), [0, 1]) == 0.5
