"""Tests for polyak.schedules: naive float64 references, source numbers, peers, bad input."""

from __future__ import annotations

import ast
import doctest
import itertools
import json
import math
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peers import timm_model_ema
from polyak import _horizon, schedules
from polyak.schedules import (
    Schedule,
    as_schedule,
    constant,
    cosine,
    debiased,
    decay_to_halflife,
    gamma_to_sigma_rel,
    halflife,
    halflife_to_decay,
    inverse_power,
    power,
    scale_decay,
    sigma_rel_to_gamma,
    uniform,
    warmup,
)

# ---------------------------------------------------------------- naive per-step references


def ref_warmup(d: float, j: int, period: int = 1, count_from: int = 1) -> float:
    s = math.ceil(j / period) - 1 + count_from
    return min(d, (1 + s) / (10 + s)) ** (1 / period)


def ref_inverse_power(d: float, j: int, inv_gamma: float, p: float, min_decay: float) -> float:
    n = j - 1
    return min(d, max(min_decay, 1 - (1 + n / inv_gamma) ** -p))


def ref_power(gamma: float, j: int) -> float:
    return (1 - 1 / j) ** (gamma + 1)


def ref_cosine(start: float, end: float, total: int, j: int) -> float:
    k = min(j - 1, total)
    return end - (end - start) * (math.cos(math.pi * k / total) + 1) / 2


def ref_debiased(d: float, j: int) -> float:
    return d * (1 - d ** (j - 1)) / (1 - d**j)


# (id, schedule factory, per-step reference j -> decay)
CASES: list[tuple[str, Callable[[], Schedule], Callable[[int], float]]] = [
    ("constant", lambda: constant(0.99), lambda j: 0.99),
    ("constant0", lambda: constant(0.0), lambda j: 0.0),
    ("warmup", lambda: warmup(0.999), lambda j: ref_warmup(0.999, j)),
    ("warmup_p7", lambda: warmup(0.99, period=7), lambda j: ref_warmup(0.99, j, 7)),
    (
        "warmup_morales",
        lambda: warmup(0.998, period=16, count_from=0),
        lambda j: ref_warmup(0.998, j, 16, 0),
    ),
    (
        "inverse_power",
        lambda: inverse_power(),
        lambda j: ref_inverse_power(0.9999, j, 1.0, 2 / 3, 0.0),
    ),
    (
        "inverse_power_34",
        lambda: inverse_power(0.999, inv_gamma=3.0, power=0.75, min_decay=0.2),
        lambda j: ref_inverse_power(0.999, j, 3.0, 0.75, 0.2),
    ),
    ("power_gamma", lambda: power(gamma=6.94), lambda j: ref_power(6.94, j)),
    (
        "power_sigma",
        lambda: power(sigma_rel=0.05),
        lambda j: ref_power(sigma_rel_to_gamma(0.05), j),
    ),
    ("uniform", uniform, lambda j: 1 - 1 / j),
    ("halflife", lambda: halflife(50), lambda j: 0.5 ** (1 / 50)),
    (
        "halflife_samples",
        lambda: halflife(samples=6400, batch_size=32),
        lambda j: 0.5 ** (32 / 6400),
    ),
    (
        "halflife_epochs",
        lambda: halflife(epochs=0.5, steps_per_epoch=90),
        lambda j: 0.5 ** (1 / 45),
    ),
    ("cosine", lambda: cosine(0.9, 1.0, total_steps=300), lambda j: ref_cosine(0.9, 1.0, 300, j)),
    (
        "cosine_down",
        lambda: cosine(0.99, 0.5, total_steps=40),
        lambda j: ref_cosine(0.99, 0.5, 40, j),
    ),
    ("debiased", lambda: debiased(0.95), lambda j: ref_debiased(0.95, j)),
    ("debiased0", lambda: debiased(0.0), lambda j: 0.0),
]
IDS = [c[0] for c in CASES]


def close(a: float, b: float, rel: float = 1e-11) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


@st.composite
def step_and_gap(draw: st.DrawFn, max_t: int = 1500) -> tuple[int, int]:
    t = draw(st.integers(1, max_t))
    return t, draw(st.integers(1, t))


@pytest.mark.parametrize(("factory", "ref"), [c[1:] for c in CASES], ids=IDS)
def test_per_step_matches_naive_reference(factory: Callable[[], Schedule], ref: Callable) -> None:
    s = factory()
    for j in [*range(1, 400), 1000, 4321, 99_999]:
        assert close(s.per_step(j), ref(j)), (j, s.per_step(j), ref(j))
        assert s(j) == s.per_step(j)


@pytest.mark.parametrize(("factory", "ref"), [c[1:] for c in CASES], ids=IDS)
@settings(max_examples=60, deadline=None)
@given(tg=step_and_gap())
def test_gap_is_product_of_per_step(
    factory: Callable[[], Schedule], ref: Callable, tg: tuple[int, int]
) -> None:
    s = factory()
    t, dt = tg
    naive = math.prod(ref(j) for j in range(t - dt + 1, t + 1))
    ours = math.prod(s.per_step(j) for j in range(t - dt + 1, t + 1))
    assert close(s(t, dt), naive), (t, dt, s(t, dt), naive)
    assert close(s(t, dt), ours)


def test_numpy_integers_are_accepted() -> None:
    s = warmup(0.99, period=4)
    assert s(np.int64(12), np.int32(5)) == s(12, 5)
    assert s.per_step(np.uint8(7)) == s.per_step(7)


# ---------------------------------------------------------------- source numbers


def first_step_reaching(s: Schedule, target: float, hi: int = 10**8) -> int:
    """Smallest t with per_step(t) >= target (per_step is non-decreasing)."""
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if s.per_step(mid) >= target - 1e-12:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_crowsonkb_warmup_numbers() -> None:
    # "reaches decay factor 0.999 at 31.6K steps, 0.9999 at 1M steps" (power=2/3) and
    # "0.999 at 10K steps, 0.9999 at 215.4k steps" (power=3/4): timm / diffusers docstrings.
    two_thirds = inverse_power(0.99999, power=2 / 3)
    assert round(first_step_reaching(two_thirds, 0.999), -2) == 31_600
    assert round(first_step_reaching(two_thirds, 0.9999), -4) == 1_000_000
    three_quarters = inverse_power(0.99999, power=3 / 4)
    assert round(first_step_reaching(three_quarters, 0.999), -2) == 10_000
    assert round(first_step_reaching(three_quarters, 0.9999), -2) == 215_400
    # The cap holds afterwards.
    assert inverse_power(0.9999).per_step(10**9) == 0.9999


def test_tf_warmup_number() -> None:
    # (1 + n) / (10 + n) reaches 0.999 at n = 8990; with n = t.
    assert first_step_reaching(warmup(0.9999), 0.999) == 8990
    assert warmup(0.999).per_step(1) == pytest.approx(2 / 11)


@pytest.mark.parametrize(
    ("sigma_rel", "gamma", "tol"),
    [(0.01, 97.0, 0.05), (0.05, 16.97, 0.005), (0.10, 6.94, 0.005), (0.2, 1.83, 0.005)],
)
def test_edm2_sigma_rel_table(sigma_rel: float, gamma: float, tol: float) -> None:
    assert abs(sigma_rel_to_gamma(sigma_rel) - gamma) <= tol
    assert abs(gamma_to_sigma_rel(gamma) - sigma_rel) < 1e-3


def test_sigma_rel_to_gamma_solves_the_cubic() -> None:
    for s in [1e-6, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.25, 0.28, 0.288]:
        g = sigma_rel_to_gamma(s)
        c = s**-2
        cubic = g**3 + 7 * g**2 + (16 - c) * g + (12 - c)
        assert abs(cubic) <= 1e-12 * (g**3 + 7 * g**2 + c * (g + 1) + 16 * g + 12)
        # Largest real root: the cubic is positive beyond it.
        h = g * (1 + 1e-9) + 1e-12
        assert h**3 + 7 * h**2 + (16 - c) * h + (12 - c) > 0


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-4, 0.2886))
def test_sigma_rel_round_trip(s: float) -> None:
    assert math.isclose(gamma_to_sigma_rel(sigma_rel_to_gamma(s)), s, rel_tol=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.05, 1e5))
def test_gamma_round_trip(g: float) -> None:
    assert math.isclose(sigma_rel_to_gamma(gamma_to_sigma_rel(g)), g, rel_tol=1e-9)


def test_horizon_conversions() -> None:
    assert halflife_to_decay(decay_to_halflife(0.999)) == pytest.approx(0.999, rel=1e-15)
    assert decay_to_halflife(0.999) == pytest.approx(math.log(0.5) / math.log(0.999))
    assert halflife_to_decay(2.0) == pytest.approx(0.5**0.5)
    # Busbridge et al.: rho=0.999 with kappa=8, 32, 256.
    assert round(scale_decay(0.999, 8), 5) == 0.99203
    assert round(scale_decay(0.999, 32), 5) == 0.96849
    assert round(scale_decay(0.999, 256), 5) == 0.77404
    assert gamma_to_sigma_rel(0) == pytest.approx(12**-0.5)
    assert power(sigma_rel=0.1)(1000, 3) == pytest.approx(power(gamma=6.937203937601806)(1000, 3))


# ---------------------------------------------------------------- averaging behaviour


def run_ema(s: Schedule, x0: float, updates: list[tuple[int, float]]) -> list[float]:
    """Copy-initialised EMA; ``updates`` is a list of (dt, value). Returns avg after each update."""
    avg, t, out = x0, 0, []
    for dt, x in updates:
        t += dt
        avg += (1 - s(t, dt)) * (x - avg)
        out.append(avg)
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.floats(-1e3, 1e3)), min_size=1, max_size=60))
def test_uniform_is_the_weighted_arithmetic_mean(updates: list[tuple[int, float]]) -> None:
    avgs = run_ema(uniform(), 12345.0, updates)
    total = sum(dt for dt, _ in updates)
    mean = sum(dt * x for dt, x in updates) / total
    assert abs(avgs[-1] - mean) <= 1e-12 * max(1.0, max(abs(x) for _, x in updates))
    plain = run_ema(uniform(), -7.0, [(1, x) for _, x in updates])
    assert plain[-1] == pytest.approx(sum(x for _, x in updates) / len(updates), abs=1e-9)


def effective_weights(s: Schedule, gaps: list[int]) -> list[float]:
    """Weight of each update's value in the final average (the initial copy's is left out)."""
    t, decays = 0, []
    for dt in gaps:
        t += dt
        decays.append(s(t, dt))
    weights = []
    for k, d in enumerate(decays):
        weights.append((1 - d) * math.prod(decays[k + 1 :]))
    return weights


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97])
def test_power_weights_follow_the_edm2_profile(gamma: float) -> None:
    rng = random.Random(0)
    for gaps in ([1] * 50, [rng.randint(1, 5) for _ in range(40)]):
        total = sum(gaps)
        w = effective_weights(power(gamma=gamma), gaps)
        a = 0
        for dt, wk in zip(gaps, w, strict=True):
            b = a + dt
            assert wk == pytest.approx(
                (b / total) ** (gamma + 1) - (a / total) ** (gamma + 1), abs=1e-12
            )
            a = b
        assert sum(w) == pytest.approx(1.0, abs=1e-12)  # the initial weights get none


@pytest.mark.parametrize("factory", [c[1] for c in CASES], ids=IDS)
@pytest.mark.parametrize("k", [1, 3, 16])
def test_update_every_k_equals_every_step_on_held_stream(factory: Callable, k: int) -> None:
    s = factory()
    rng = random.Random(k)
    samples = [rng.uniform(-1, 1) for _ in range(40)]
    sparse = run_ema(s, 0.3, [(k, x) for x in samples])
    dense = run_ema(s, 0.3, [(1, x) for x in samples for _ in range(k)])
    for m, value in enumerate(sparse):
        assert value == pytest.approx(dense[(m + 1) * k - 1], abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.floats(-1, 1)), min_size=1, max_size=30))
def test_irregular_gaps_equal_every_step_on_held_stream(updates: list[tuple[int, float]]) -> None:
    for s in (
        constant(0.97),
        warmup(0.99),
        power(gamma=3.0),
        debiased(0.9),
        warmup(0.99, period=5),
    ):
        sparse = run_ema(s, 0.5, updates)
        dense = run_ema(s, 0.5, [(1, x) for dt, x in updates for _ in range(dt)])
        ends = np.cumsum([dt for dt, _ in updates]) - 1
        assert np.allclose(sparse, np.asarray(dense)[ends], rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    st.floats(0.0, 0.999),
    st.floats(-5, 5),
    st.lists(st.floats(-1, 1), min_size=1, max_size=200),
)
def test_debiased_equals_zero_init_adam_debiased(b: float, x0: float, xs: list[float]) -> None:
    avg = run_ema(debiased(b), x0, [(1, x) for x in xs])
    m = 0.0
    for t, x in enumerate(xs, start=1):
        m = b * m + (1 - b) * x
        assert avg[t - 1] == pytest.approx(m / (1 - b**t), abs=1e-12)


def test_debiased_over_gaps_removes_the_initial_weights() -> None:
    s = debiased(0.99)
    assert s(1) == 0.0 and s(7, 7) == 0.0
    assert s(10**6) == pytest.approx(0.99, rel=1e-15)


def test_halflife_initial_weight_halves() -> None:
    for s, h in [(halflife(40), 40), (halflife(samples=4000, batch_size=50), 80)]:
        weight = math.prod(s.per_step(j) for j in range(1, h + 1))
        assert weight == pytest.approx(0.5, abs=1e-12)
        assert s(h, h) == pytest.approx(0.5, abs=1e-15)
    assert halflife(steps=693).name == "halflife(steps=693)"


def test_halflife_samples_keeps_the_horizon_when_batch_size_changes() -> None:
    s = halflife(samples=10_000, batch_size=100)
    before = s.per_step(1)
    weight = s(300, 300)  # 30k samples at batch 100
    s.batch_size = 400
    assert s.per_step(301) == pytest.approx(scale_decay(before, 4), rel=1e-14)
    weight *= s(400, 100)  # 40k samples at batch 400
    assert weight == pytest.approx(0.5 ** ((300 * 100 + 100 * 400) / 10_000), rel=1e-12)
    assert s.halflife_steps == 25


def test_halflife_state_round_trip() -> None:
    s = halflife(samples=10_000, batch_size=100)
    s.batch_size = 256
    state = json.loads(json.dumps(s.state_dict()))
    fresh = halflife(samples=10_000, batch_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(state)
    assert fresh.batch_size == 256 and fresh(5, 2) == s(5, 2)
    e = halflife(epochs=2, steps_per_epoch=100)
    assert e(200, 200) == pytest.approx(0.5)
    e.steps_per_epoch = 50
    assert e(200, 100) == pytest.approx(0.5)
    restored = halflife(epochs=2, steps_per_epoch=100)
    restored.load_state_dict(e.state_dict())
    assert restored.steps_per_epoch == 50
    with pytest.warns(UserWarning, match=r"samples=10000.*samples=20000"):
        halflife(samples=20_000, batch_size=100).load_state_dict(state)
    # A steps-mode state has no steps_per_epoch: refused, and nothing is half-loaded.
    target = halflife(epochs=1, steps_per_epoch=7, batch_size=100)
    with pytest.raises(ValueError, match="steps_per_epoch is required"):
        target.load_state_dict(halflife(5, batch_size=3).state_dict())
    assert (target.batch_size, target.steps_per_epoch) == (100, 7)


def test_cosine_ramp() -> None:
    s = cosine(0.996, 1.0, total_steps=1000)
    values = [s.per_step(t) for t in range(1, 1200)]
    assert values[0] == 0.996 and values[1000] == 1.0 and values[-1] == 1.0
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[500] == pytest.approx(0.998)
    for k in (0, 17, 999):  # BYOL: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
        assert values[k] == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / 1000) + 1) / 2)
    down = [cosine(0.99, 0.9, total_steps=10).per_step(t) for t in range(1, 15)]
    assert all(a >= b for a, b in itertools.pairwise(down)) and down[-1] == 0.9


# ---------------------------------------------------------------- peers


def load_timm_model_ema():  # type: ignore[no-untyped-def]
    module = timm_model_ema()
    if module is None:
        pytest.skip("timm/utils/model_ema.py could not be loaded (reason printed)")
    return module


STEPS = [*range(1, 3000), 10_000, 31_623, 215_444, 10**6, 10**7]


@pytest.mark.parametrize(
    ("decay", "inv_gamma", "p"), [(0.9999, 1.0, 2 / 3), (0.999, 1.0, 3 / 4), (0.9999, 7.0, 0.5)]
)
def test_inverse_power_matches_timm_and_diffusers(decay: float, inv_gamma: float, p: float) -> None:
    torch = pytest.importorskip("torch")
    training_utils = pytest.importorskip("diffusers.training_utils")
    timm_ema = load_timm_model_ema()
    ours = inverse_power(decay, inv_gamma=inv_gamma, power=p)
    timm = timm_ema.ModelEmaV3(
        torch.nn.Linear(1, 1), decay=decay, use_warmup=True, warmup_gamma=inv_gamma, warmup_power=p
    )
    diff = training_utils.EMAModel(
        torch.nn.Linear(1, 1).parameters(),
        decay=decay,
        use_ema_warmup=True,
        inv_gamma=inv_gamma,
        power=p,
    )
    for t in STEPS:
        assert ours(t) == pytest.approx(timm.get_decay(t), rel=1e-14, abs=1e-15), t
        assert ours(t) == pytest.approx(diff.get_decay(t), rel=1e-14, abs=1e-15), t


def test_inverse_power_min_decay_differs_from_timm_only_at_step_1() -> None:
    torch = pytest.importorskip("torch")
    timm_ema = load_timm_model_ema()
    timm = timm_ema.ModelEmaV3(torch.nn.Linear(1, 1), use_warmup=True, min_decay=0.5)
    ours = inverse_power(min_decay=0.5)
    assert timm.get_decay(1) == 0.0 and ours(1) == 0.5  # documented difference
    for t in range(2, 500):
        assert ours(t) == pytest.approx(timm.get_decay(t), rel=1e-14)


def test_warmup_matches_torch_ema_decays_inferred_from_values() -> None:
    torch = pytest.importorskip("torch")
    torch_ema = pytest.importorskip("torch_ema")
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ema = torch_ema.ExponentialMovingAverage([p], decay=0.99, use_num_updates=True)
    ours = warmup(0.99)
    for t in range(1, 1500):
        old = ema.shadow_params[0].item()
        value = old + (1.0 if t % 2 else -1.0)  # distance 1 from the average: 1 - decay is exact
        with torch.no_grad():
            p.fill_(value)
        ema.update()
        applied = 1.0 - (old - ema.shadow_params[0].item()) / (old - value)
        assert applied == pytest.approx(ours(t), abs=1e-12), t


def test_warmup_matches_diffusers_without_ema_warmup_shifted_by_one() -> None:
    torch = pytest.importorskip("torch")
    training_utils = pytest.importorskip("diffusers.training_utils")
    diff = training_utils.EMAModel(torch.nn.Linear(1, 1).parameters(), decay=0.999)
    shifted = warmup(0.999, count_from=0)
    assert diff.get_decay(1) == 0.0 and shifted(1) == pytest.approx(0.1)
    for t in [*range(2, 3000), 8991, 10**5]:
        assert diff.get_decay(t) == pytest.approx(shifted(t), rel=1e-15)
        assert diff.get_decay(t) == pytest.approx(warmup(0.999)(t - 1), rel=1e-15)


class MoralesCounter:
    """The update counter of Morales-Brotons et al.'s EMA: starts at 0, used, then incremented."""

    def __init__(self, alpha: float) -> None:
        self.alpha, self.count = alpha, 0

    def next_decay(self) -> float:
        decay = min(self.alpha, (self.count + 1) / (self.count + 10))
        self.count += 1
        return decay


def test_warmup_period_reproduces_morales_update_counter() -> None:
    # OptimizerEMA: counter starts at 0, decay min(alpha, (s+1)/(s+10)), then s += 1.
    alpha, period = 0.998, 16
    ours = warmup(alpha, period=period, count_from=0)
    morales = MoralesCounter(alpha)
    for t in range(period, 6000 * period, period):
        assert ours(t, period) == pytest.approx(morales.next_decay(), rel=1e-14)
    # 0.998 is reached at the 4491st update (s = 4490).
    assert ours(4490 * period, period) < alpha == ours(4491 * period, period)
    # The default counter (TF / torch_ema) is one ahead.
    assert warmup(alpha, period=period)(period, period) == pytest.approx(2 / 11)


# ---------------------------------------------------------------- API, names, state


def test_names() -> None:
    assert constant(0.999).name == "0.999"
    assert warmup(0.999).name == "warmup(0.999)"
    assert warmup(0.998, period=16, count_from=0).name == "warmup(0.998, period=16, count_from=0)"
    assert power(sigma_rel=0.05).name == "power(sigma_rel=0.05)"
    assert power(gamma=7.0).name == "power(gamma=7.0)"
    assert uniform().name == "uniform"
    assert halflife(samples=1e6, batch_size=512).name == "halflife(samples=1e+06)"
    assert debiased(0.99).name == "debiased(0.99)"
    assert inverse_power().name == "inverse_power(0.9999, power=0.6667)"
    assert (
        inverse_power(0.999, inv_gamma=10, power=0.75, min_decay=0.1).name
        == "inverse_power(0.999, power=0.75, inv_gamma=10, min_decay=0.1)"
    )
    assert cosine(total_steps=10).name == "cosine(0.996, 1.0, total_steps=10)"


@pytest.mark.parametrize("factory", [c[1] for c in CASES], ids=IDS)
def test_state_dict_json_round_trip_and_repr(factory: Callable[[], Schedule]) -> None:
    s = factory()
    state = json.loads(json.dumps(s.state_dict()))
    assert state["kind"] == s.kind
    rebuilt = eval(repr(s), vars(schedules))  # repr is constructor-like
    assert rebuilt.state_dict() == s.state_dict()
    assert rebuilt(123, 45) == s(123, 45)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt.load_state_dict(state)


def test_load_state_dict_warns_and_rejects() -> None:
    with pytest.warns(UserWarning, match=r"decay=0\.99.*decay=0\.9"):
        constant(0.9).load_state_dict(constant(0.99).state_dict())
    with pytest.warns(UserWarning, match=r"period=16.*period=1"):
        warmup(0.9).load_state_dict(warmup(0.9, period=16).state_dict())
    with pytest.raises(ValueError, match=r"'warmup'.*'constant'"):
        constant(0.9).load_state_dict(warmup(0.9).state_dict())
    with pytest.raises(TypeError, match="list"):
        constant(0.9).load_state_dict([])  # type: ignore[arg-type]


def test_as_schedule() -> None:
    s = uniform()
    assert as_schedule(s) is s
    c = as_schedule(0.9)
    assert c.state_dict() == {"kind": "constant", "decay": 0.9} and c(3, 2) == pytest.approx(0.81)
    assert as_schedule(np.float32(0.5))(1) == 0.5
    assert as_schedule(1).name == "1.0"

    def my_decay(t: int, dt: int) -> float:
        return 0.9**dt * (t > dt)

    w = as_schedule(my_decay)
    assert w.name == "my_decay" and w.state_dict() == {"kind": "callable", "name": "my_decay"}
    assert w(5, 2) == pytest.approx(0.81) and w(2, 2) == 0.0 and w.per_step(1) == 0.0
    with pytest.raises(ValueError, match=r"1\.5"):
        as_schedule(lambda t, dt: 1.5)(3)


BAD: list[tuple[Callable[[], object], type[Exception], str]] = [
    (lambda: constant(1.5), ValueError, r"decay.*1\.5"),
    (lambda: constant(-0.1), ValueError, r"-0\.1"),
    (lambda: constant(float("nan")), ValueError, "nan"),
    (lambda: constant("0.9"), TypeError, r"'0\.9'.*str"),
    (lambda: constant(True), TypeError, "bool"),
    (lambda: warmup(0.99, period=0), ValueError, "period must be >= 1, got 0"),
    (lambda: warmup(0.99, period=2.0), TypeError, r"period.*2\.0"),
    (lambda: warmup(0.99, count_from=-1), ValueError, "count_from.*-1"),
    (lambda: inverse_power(inv_gamma=0), ValueError, "inv_gamma.*0"),
    (lambda: inverse_power(power=-1), ValueError, "power.*-1"),
    (lambda: inverse_power(0.4, min_decay=0.5), ValueError, r"min_decay.*0\.5"),
    (lambda: power(), ValueError, "exactly one.*None"),
    (lambda: power(sigma_rel=0.05, gamma=1.0), ValueError, r"sigma_rel=0\.05.*gamma=1\.0"),
    (lambda: power(sigma_rel=0.3), ValueError, r"sigma_rel.*0\.3"),
    (lambda: power(gamma=-0.5), ValueError, r"gamma.*-0\.5"),
    (lambda: halflife(), ValueError, "exactly one"),
    (lambda: halflife(10, samples=10), ValueError, "'steps': 10.*'samples': 10"),
    (lambda: halflife(0), ValueError, "steps must be > 0, got 0"),
    (lambda: halflife(samples=100), ValueError, "batch_size"),
    (lambda: halflife(epochs=1), ValueError, "steps_per_epoch"),
    (lambda: halflife(samples=100, batch_size=-3), ValueError, "batch_size.*-3"),
    (lambda: cosine(total_steps=0), ValueError, "total_steps.*0"),
    (lambda: cosine(1.2, total_steps=10), ValueError, r"start.*1\.2"),
    (lambda: debiased(1.0), ValueError, r"decay.*1\.0"),
    (lambda: uniform()(0), ValueError, "t must be >= 1, got 0"),
    (lambda: uniform()(3, 4), ValueError, "t=3, dt=4"),
    (lambda: uniform()(3, 0), ValueError, "dt must be >= 1, got 0"),
    (lambda: uniform()(2.0), TypeError, r"t must be an integer, got 2\.0"),
    (lambda: uniform()(True), TypeError, "bool"),
    (lambda: uniform().per_step(-2), ValueError, "-2"),
    (lambda: halflife_to_decay(0), ValueError, "halflife_steps.*0"),
    (lambda: decay_to_halflife(1.0), ValueError, r"decay.*1\.0"),
    (lambda: decay_to_halflife(0.0), ValueError, r"decay.*0\.0"),
    (lambda: scale_decay(0.9, 0), ValueError, "kappa.*0"),
    (lambda: scale_decay(1.1, 2), ValueError, r"1\.1"),
    (lambda: sigma_rel_to_gamma(0.29), ValueError, r"0\.29"),
    (lambda: sigma_rel_to_gamma(0), ValueError, "sigma_rel.*0"),
    (lambda: gamma_to_sigma_rel(-1), ValueError, "gamma.*-1"),
    (lambda: as_schedule("0.9"), TypeError, "str"),
    (lambda: as_schedule(True), TypeError, "bool"),
    (lambda: as_schedule(2), ValueError, "2"),
    (lambda: as_schedule(None), TypeError, "NoneType"),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_names_the_value(call: Callable[[], object], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_halflife_setters_validate() -> None:
    s = halflife(samples=100, batch_size=10)
    with pytest.raises(ValueError, match="batch_size must be > 0, got 0"):
        s.batch_size = 0
    with pytest.raises(ValueError, match="batch_size is required"):
        s.batch_size = None
    assert s.batch_size == 10  # unchanged after the failed assignments


# ---------------------------------------------------------------- module hygiene


def test_docstring_examples_hold() -> None:
    for module in (schedules, _horizon):
        result = doctest.testmod(module)
        assert result.attempted > 5 and result.failed == 0, module.__name__


def test_core_imports_only_the_standard_library() -> None:
    allowed = {
        "__future__",
        "copy",
        "math",
        "numbers",
        "operator",
        "warnings",
        "collections",
        "typing",
    }
    from polyak import _weighted, averages

    for module in (schedules, _horizon, _weighted, averages):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["polyak." * bool(node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                core = ("polyak._horizon", "polyak._weighted", "polyak.schedules")
                assert name in core or name.split(".")[0] in allowed, name


def test_sigma_rel_to_gamma_for_widths_down_to_the_smallest_float():
    """gamma ~ 1/sigma_rel - 2 for narrow widths: no overflow down to 1e-300 (s**-2 would)."""
    for s in (1e-3, 1e-6, 1e-100, 1e-300):
        g = schedules.sigma_rel_to_gamma(s)
        assert math.isfinite(g) and abs(g * s - 1.0) < 1e-2
        if s >= 1e-100:  # gamma_to_sigma_rel underflows past that
            assert schedules.gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-12)
    assert [schedules.power(sigma_rel=1e-300)(t) for t in (1, 2, 10)] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="sigma_rel=5e-324 is too small"):
        schedules.sigma_rel_to_gamma(5e-324)


def test_power_inner_of_very_narrow_profiles_does_not_overflow():
    from polyak.posthoc.profiles import power_inner

    with np.errstate(all="raise"):
        value = float(power_inner(100.0, 1e300, 100.0, 1e300))
    assert value == pytest.approx(0.5e300 / 100.0)
