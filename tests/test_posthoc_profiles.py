"""EDM2's least-squares solve: inner products, normalisation, fit, and the discrete averages."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.integrate import quad

from polyak import schedules
from polyak.posthoc.profiles import (
    Target,
    _target_terms,
    power_inner,
    profile_masses,
    solve,
    target_masses,
)
from reference import timeline_average

G05, G10 = schedules.sigma_rel_to_gamma(0.05), schedules.sigma_rel_to_gamma(0.10)


def _power_density(t, g):
    return lambda x: (g + 1.0) * (x / t) ** g / t if x <= t else 0.0


def _exp_density(t, decay):
    lam = -math.log(decay)
    return lambda x: lam * math.exp(-lam * (t - x)) / -math.expm1(-lam * t)


@pytest.mark.parametrize(
    ("ta", "ga", "tb", "gb"), [(100, G05, 200, G10), (300, G10, 200, G05), (50, 0.0, 50, 3.0)]
)
def test_power_inner_product_matches_numerical_integration(ta, ga, tb, gb):
    pa, pb = _power_density(ta, ga), _power_density(tb, gb)
    ref = quad(lambda x: pa(x) * pb(x), 0, min(ta, tb), epsabs=0, epsrel=1e-12)[0]
    assert float(power_inner(ta, ga, tb, gb)) == pytest.approx(ref, rel=1e-10)
    assert float(power_inner(ta, ga, tb, gb)) == float(power_inner(tb, gb, ta, ga))


@pytest.mark.parametrize(
    ("ti", "gi", "t", "decay"),
    [
        (100, G05, 200, 0.99),
        (300, G10, 200, 0.999),
        (2000, G05, 2000, 0.9995),
        (1e6, 0.5, 1e6, 0.99999),
    ],
)
def test_exponential_target_terms_match_numerical_integration(ti, gi, t, decay):
    p, q = _power_density(ti, gi), _exp_density(t, decay)
    m = min(ti, t)
    peak = [m * (1 - 1 / (gi + 1 - math.log(decay) * m))]
    ref_b = quad(lambda x: p(x) * q(x), 0, m, epsabs=0, epsrel=1e-12, limit=500, points=peak)[0]
    ref_n = quad(lambda x: q(x) ** 2, 0, t, epsabs=0, epsrel=1e-12, limit=500, points=peak)[0]
    b, norm2 = _target_terms(
        np.array([float(ti)]), np.array([gi]), float(t), Target.make(decay=decay)
    )
    assert b[0] == pytest.approx(ref_b, rel=1e-9)
    assert norm2 == pytest.approx(ref_n, rel=1e-9)


def test_power_profile_masses_are_the_discrete_power_average_weights():
    """The mass of p on (s-1, s] is the weight the per-step power EMA gives step s."""
    t, g = 37, 4.2
    ident = np.eye(t)
    decay = schedules.power(gamma=g)
    weights = timeline_average(list(ident), decay.per_step, np.zeros(t))
    masses = profile_masses(np.arange(t + 1.0), [t], [g])[:, 0]
    np.testing.assert_allclose(masses, weights, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(target_masses(np.arange(t + 1.0), t, Target(gamma=g)), weights)


def test_constant_decay_profile_masses_are_the_debiased_ema_weights():
    t, d = 50, 0.93
    ident = np.eye(t)
    weights = timeline_average(list(ident), schedules.debiased(d).per_step, np.zeros(t))
    masses = target_masses(np.arange(t + 1.0), t, Target.make(decay=d))
    np.testing.assert_allclose(masses, weights, rtol=1e-11, atol=1e-15)


def _grid(every, total=2000):
    steps = np.arange(every, total + 1, every, dtype=np.float64)
    return np.repeat(steps, 2), np.tile([G05, G10], len(steps))


def test_a_stored_profile_is_reproduced_by_its_own_snapshot():
    ts, gs = _grid(100)
    for j in (len(ts) - 1, len(ts) - 2):  # the last snapshot of each average
        s = solve(ts, gs, ts[j], Target(gamma=gs[j]))
        expected = np.zeros(len(ts))
        expected[j] = 1.0
        np.testing.assert_allclose(s.coefficients, expected, atol=1e-8)
        assert s.fit < 1e-6


def test_coefficients_sum_to_one_and_the_fit_improves_with_more_snapshots():
    fits = []
    for every in (400, 200, 100, 50):
        ts, gs = _grid(every)
        s = solve(ts, gs, 2000.0, Target.make(0.08))
        assert s.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
        assert s.amplification < 2.0
        fits.append(s.fit)
    assert all(a > 3 * b for a, b in itertools.pairwise(fits)), fits  # ~1/n**2
    assert fits[2] < 3e-3 and fits[3] < 1e-3


def test_fit_is_the_l2_distance_between_achieved_and_target_profiles():
    ts, gs = _grid(400)
    for target in (Target.make(0.08), Target.make(decay=0.998)):
        s = solve(ts, gs, 2000.0, target)
        edges = np.linspace(0.0, 2000.0, 200_001)
        width = np.diff(edges)
        achieved = profile_masses(edges, s.ts, s.gammas, s.coefficients) / width
        wanted = target_masses(edges, 2000.0, target) / width
        l2 = math.sqrt(np.sum((achieved - wanted) ** 2 * width) / np.sum(wanted**2 * width))
        assert s.fit == pytest.approx(l2, rel=1e-3)


def test_bad_targets_and_snapshots_are_named():
    with pytest.raises(ValueError, match="exactly one"):
        Target.make(0.1, decay=0.9)
    with pytest.raises(ValueError, match="sigma_rel"):
        Target.make(0.3)
    with pytest.raises(ValueError, match="decay"):
        Target.make(decay=1.0)
    with pytest.raises(ValueError, match=r"\(0, 100"):
        solve([50.0, 150.0], [G05, G05], 100.0, Target.make(0.1))
    assert Target.make(0.08).label == "sigma_rel=0.08"
    assert Target.make(decay=0.9995).label == "decay=0.9995"
