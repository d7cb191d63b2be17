"""Merge weights that mean something, each against a reference written from its definition.

* WSM: derived here from ``theta_hat = theta_n - eta sum_i w_i g_{n+i-1}`` on a quadratic toy
  whose stochastic gradients are recorded: the merge of the constant-rate checkpoints equals the
  decayed-rate iterate built from the same gradients (float64 rounding), for the linear, cosine
  and 1-sqrt shapes and checkpoints at every step or every few; the weights sum to 1. When the
  decayed run takes its own gradients the two differ at second order in the rate (measured).
* EMA and power equivalents: with a checkpoint at every step the merge is the average kept by
  ``polyak.EMA`` (float64 loop of ``tests/reference.py``); with fewer, it stays within the
  reported ``fit`` times each weight's total variation (the bound summation by parts gives),
  and snapshots of a post-hoc store give ``polyak.posthoc.reconstruct``'s average.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import polyak
from polyak import schedules
from polyak.merge import weights as W
from reference import ema as reference_ema

SHAPES = {
    "linear": lambda u: 1.0 - u,
    "cosine": lambda u: 0.5 * (1.0 + np.cos(np.pi * u)),
    "1-sqrt": lambda u: 1.0 - np.sqrt(u),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("every", [1, 7])
def test_wsm_weights_sum_to_one_and_follow_the_papers_mapping(shape, every):
    window = 70
    steps = list(range(0, 141, every)) + ([140] if 140 % every else [])
    w = W.wsm(steps, shape, window=window)
    assert sum(w) == pytest.approx(1.0, abs=1e-12) and min(w) >= 0
    assert w.steps == tuple(steps) and w.fit is None
    if every == 1:  # c_0 = 1 - w_1, c_j = w_j - w_{j+1}, c_k = w_k (checkpoint n = 70 is c_0)
        mult = SHAPES[shape](np.arange(window) / window)
        expected = np.concatenate([[1 - mult[0]], mult[:-1] - mult[1:], [mult[-1]]])
        np.testing.assert_allclose(w.values[70:], expected, atol=1e-15)
        assert not w.values[:70].any()


def _quadratic_run(eta, multipliers, steps, seed=0):
    """SGD on f(theta) = 1/2 (theta - c)^T H (theta - c) with recorded noisy gradients.

    Returns the constant-rate iterates at ``steps``, the gradients it took, and the iterate of
    a run whose rate at step t is ``eta * multipliers[t]`` taking its *own* gradients (same
    noise)."""
    rng = np.random.default_rng(seed)
    d, total = 5, len(multipliers)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    h = q @ np.diag(np.linspace(0.2, 2.0, d)) @ q.T
    c = rng.standard_normal(d)
    noise = rng.standard_normal((total, d))
    theta, own = rng.standard_normal(d) * 3, None
    own = theta.copy()
    saved, grads = {}, []
    for t in range(total + 1):
        if t in steps:
            saved[t] = theta.copy()
        if t == total:
            break
        g = h @ (theta - c) + noise[t]
        grads.append(g)
        theta = theta - eta * g
        own = own - eta * multipliers[t] * (h @ (own - c) + noise[t])
    return saved, np.array(grads), own


def _merged(saved, steps, w, tmp_path):
    """The checkpoints written as float64 safetensors and merged by polyak.merge."""
    from safetensors.torch import load_file, save_file

    tmp_path.mkdir(exist_ok=True)
    paths = []
    for s in steps:
        paths.append(tmp_path / f"ckpt-{s}.safetensors")
        save_file({"theta": torch.from_numpy(saved[s])}, paths[-1])
    polyak.merge.merge(paths, w, tmp_path / "out", steps=steps)
    return load_file(tmp_path / "out" / "model.safetensors")["theta"].numpy()


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("every", [1, 5])
def test_wsm_merge_is_the_decayed_iterate_on_a_quadratic(shape, every, tmp_path):
    total, window, eta = 120, 60, 0.05
    n = total - window
    steps = sorted({0, *range(n, total + 1, every)})
    mult = np.ones(total)
    mult[n:] = SHAPES[shape](np.arange(window) / window)
    for a, b in itertools.pairwise(steps):  # held at its mean between two checkpoints
        mult[a:b] = mult[a:b].mean()  # (the merge's resolution; exact per step with every=1)
    first = steps[steps.index(n) :]
    saved, grads, _ = _quadratic_run(eta, np.ones(total), steps)
    decayed = saved[n] - eta * (mult[n:, None] * grads[n:]).sum(0)  # the same gradients
    merged = _merged(saved, steps, W.wsm(steps, shape, window=window), tmp_path)
    scale = np.abs(decayed).max()
    assert np.abs(merged - decayed).max() <= 1e-12 * scale
    # the derivation is what makes it exact: LAWA over the window is not the decayed iterate
    lawa = _merged(saved, steps, W.lawa(steps, len(first)), tmp_path / "lawa")
    assert np.abs(lawa - decayed).max() > 1e-3 * scale


def test_wsm_against_a_run_that_decays_is_second_order_in_the_rate(tmp_path):
    """A real decayed run takes its own gradients: the gap shrinks ~4x when eta halves."""
    total, window = 200, 100
    steps = list(range(total - window, total + 1))
    mult = np.ones(total)
    mult[total - window :] = SHAPES["linear"](np.arange(window) / window)
    gaps = []
    for eta in (0.001, 0.0005, 0.00025):
        saved, _, own = _quadratic_run(eta, mult, steps)
        merged = sum(c * saved[s] for c, s in zip(W.wsm(steps, "linear", window=window), steps))
        gaps.append(np.abs(merged - own).max())
    ratios = [gaps[0] / gaps[1], gaps[1] / gaps[2]]
    assert all(3.3 < r < 4.5 for r in ratios), ratios


def test_wsm_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="window=300 is longer than the run"):
        W.wsm([0, 100, 200], window=300)
    with pytest.raises(ValueError, match="starts at step 150, before the first checkpoint"):
        W.wsm([160, 200, 250], window=100)
    with pytest.raises(ValueError, match="increases over the window"):
        W.wsm(range(0, 11), lambda u: u, window=10)
    with pytest.raises(ValueError, match=r"shape\(0\) = 2: .* in \[0, 1\]"):
        W.wsm(range(0, 11), lambda u: 2.0, window=10)
    with pytest.raises(ValueError, match="unknown shape 'sqrt'"):
        W.wsm(range(0, 11), "sqrt", window=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"steps\[2\] = 5 follows 10"):
        W.wsm([0, 10, 5], window=5)


def _trajectory(total, seed=0):
    """A small model, its optimizer and data (full-batch gradient descent: a smooth path, on
    which the bound is close to tight), and the list of states to fill (theta_0 first)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(256, 6), torch.randn(256, 2)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    return model, opt, x, y, states


@pytest.mark.parametrize(
    ("make", "schedule"),
    [
        (lambda steps: W.ema(steps, 0.98), schedules.debiased(0.98)),
        (lambda steps: W.power(steps, 0.15), schedules.power(sigma_rel=0.15)),
    ],
    ids=["ema", "power"],
)
def test_ema_and_power_equivalents_reproduce_a_kept_average_to_the_reported_fit(
    make, schedule, tmp_path
):
    total = 300
    model, opt, x, y, states = _trajectory(total)
    kept = polyak.EMA(model, schedule, dtype=torch.float64)
    for _ in range(total):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        kept.update()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    decays = [schedule(t) for t in range(1, total + 1)]
    for name, value in kept.averaged_tensors().items():  # polyak's average is the float64 loop
        ref = reference_ema([s[name].numpy() for s in states[1:]], decays, states[0][name].numpy())
        np.testing.assert_allclose(value.numpy(), ref, rtol=1e-12, atol=1e-12)
    every = make(range(total + 1))  # a checkpoint at every step: the merge is the average
    assert every.fit == pytest.approx(0.0, abs=1e-12)
    for name, value in kept.averaged_tensors().items():
        merged = sum(c * s[name].double() for c, s in zip(every.values, states))
        torch.testing.assert_close(merged, value, rtol=1e-10, atol=1e-10)
    from safetensors.torch import load_file, save_file

    for spacing in (5, 25):
        steps = list(range(0, total + 1, spacing))
        w = make(steps)
        paths = [tmp_path / f"{spacing}-{s}.safetensors" for s in steps]
        for p, s in zip(paths, steps):
            save_file(states[s], p)
        polyak.merge.merge(paths, w, tmp_path / f"out{spacing}", steps=steps)
        merged = load_file(tmp_path / f"out{spacing}" / "model.safetensors")
        for name, value in kept.averaged_tensors().items():
            path = torch.stack([s[name].double() for s in states])
            variation = (path[1:] - path[:-1]).abs().sum(0)
            error = (merged[name].double() - value).abs()
            bound = w.fit * variation + 1e-6 * value.abs().max()  # + float32 rounding
            assert bool((error <= bound).all()), (name, spacing, float((error - bound).max()))
            if spacing == 25:  # and the bound is not vacuous: the run's plain mean breaks it
                mean = sum(states[s][name].double() for s in steps) / len(steps)
                assert not bool(((mean - value).abs() <= bound).all())


def test_power_weights_over_a_stores_snapshots_are_the_reconstruction(tmp_path):
    from posthoc_helpers import Walk, small_model

    model = small_model()
    ph = polyak.PostHocEMA(model, tmp_path / "s", snapshot_every=10, snapshot_dtype=torch.float32)
    walk = Walk(model)
    for _ in range(100):
        walk.step()
        ph.update()
    ph.close()
    sources = polyak.merge.open_sources([f"{tmp_path / 's'}::averages"])
    try:
        steps = [s.step for s in sources]
        gammas = [s.gamma for s in sources]
        assert len(sources) == 20 and None not in gammas
        w = W.power(steps, 0.08, gammas=gammas)
        rec = polyak.posthoc.reconstruct(tmp_path / "s", sigma_rel=0.08)
        got = dict(zip(sources, w.values))
        for (step, key), x in zip(rec.sources, rec.coefficients):
            (source,) = [s for s in sources if s.step == step and s.name.endswith(f"{key}@{step}")]
            assert got[source] == pytest.approx(x, abs=1e-12)
        assert w.fit is not None and 0 < w.fit < 0.05
        polyak.merge.merge(sources, w, tmp_path / "out")
    finally:
        for s in sources:
            s.close()
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name, value in rec.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6)


def test_explicit_weights_are_normalised_or_refused_with_the_reason():
    assert W.explicit([2, 2, 4]).values.tolist() == [0.25, 0.25, 0.5]
    assert W.explicit(np.array([0.0, 3.0])).values.tolist() == [0.0, 1.0]
    for bad, match in [
        ([1, -1], "weight 1 is -1: merge weights must be >= 0"),
        ([1, float("nan")], "weight 1 is nan: every weight must be a finite number >= 0"),
        ([float("inf")], "weight 0 is inf"),
        ([], "no weights given"),
        ([0, 0], r"sum to 0; give at least one positive weight"),
    ]:
        with pytest.raises(ValueError, match=match):
            W.explicit(bad)
    with pytest.raises(TypeError, match="sequence of numbers"):
        W.explicit("1 2")  # type: ignore[arg-type]


def test_lawa_is_the_mean_of_the_last_k():
    assert W.lawa([10, 20, 30], 2).values.tolist() == [0.0, 0.5, 0.5]
    assert W.lawa(4, 4).values.tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="k=4 is more than the 3 checkpoints"):
        W.lawa([10, 20, 30], 4)
