"""Weighted averages (schedules.weighted, polynomial, lr_weighted) and DINO's teacher momentum:
float64 references written from the definitions, exactness under update_every, Schedule-Free's
reference optimizer as the peer of lr_weighted, resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import polyak
from polyak import schedules


def _values(steps: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(np.cumsum(rng.normal(size=(steps, 5)), axis=0))


def _definition(values, weight, every=1):
    """sum_s w_s theta_s / sum_s w_s, where an update every ``every`` steps sees the value at
    the end of each gap, held over the gap (what the average receives), in float64."""
    num, den = np.zeros_like(values[0], dtype=np.float64), 0.0
    for end in range(every, len(values) + 1, every):
        w = sum(weight(j) for j in range(end - every + 1, end + 1))
        num += w * values[end - 1]
        den += w
    return num / den


def _feed(values, decay, every=1):
    avg = polyak.ArrayEMA(np.zeros(5), decay, update_every=every)
    for v in values:
        avg.update(v)
    return avg.get()


CASES = [
    (schedules.weighted(lambda t: 1.0 + math.sin(t)), lambda t: 1.0 + math.sin(t)),
    (schedules.polynomial(0.0), lambda t: 1.0),
    (schedules.polynomial(1.5), lambda t: t**1.5),
    (schedules.lr_weighted(lambda t: min(1.0, t / 7)), lambda t: min(1.0, t / 7) ** 2),
    (
        schedules.lr_weighted(lambda t: 0.1 * math.cos(t / 40), r=1.0, running_max=False),
        lambda t: t * (0.1 * math.cos(t / 40)) ** 2,
    ),
]


@pytest.mark.parametrize("every", [1, 3, 7])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_average_is_the_weighted_mean_also_when_updating_every_k_steps(case, every):
    schedule, weight = CASES[case]
    values = _values(42)
    got = _feed(values, copy.deepcopy(schedule), every)
    np.testing.assert_allclose(got, _definition(values, weight, every), rtol=1e-12, atol=1e-12)


def test_the_decay_over_a_gap_is_the_product_of_the_per_step_decays():
    s = schedules.polynomial(2.0)
    for t, dt in [(5, 1), (9, 4), (30, 30), (100, 7)]:
        product = math.prod(s.per_step(j) for j in range(t - dt + 1, t + 1))
        assert s(t, dt) == pytest.approx(product, rel=1e-13)


def test_lr_weighted_equals_schedule_free_reference_optimizer():
    """schedulefree's SGDScheduleFreeReference keeps x, the average of its z iterates with
    c_t = t^r lr_max^2 / sum: the same average of the recorded z is lr_weighted's."""
    pytest.importorskip("schedulefree")  # a test dependency, not in the oldest-versions job
    from schedulefree import SGDScheduleFreeReference

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    target = torch.randn(6, dtype=torch.float64)
    opt = SGDScheduleFreeReference([w], lr=0.3, warmup_steps=5, r=0.5, weight_lr_power=2.0)
    opt.train()
    avg = polyak.ArrayEMA(
        np.zeros(6), schedules.lr_weighted(lambda t: 0.3 * min(1.0, t / 5), r=0.5)
    )
    for _ in range(25):
        loss = ((w - target) ** 2).sum() + torch.randn(()) * 0  # deterministic
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg.update(opt.state[w]["z"].numpy().copy())
    np.testing.assert_allclose(avg.get(), opt.state[w]["x"].numpy(), rtol=1e-12, atol=1e-14)


def test_dino_momentum_is_dinos_cosine_schedule():
    total = 50
    dino = [1.0 + 0.5 * (0.996 - 1.0) * (1 + math.cos(math.pi * i / total)) for i in range(total)]
    s = schedules.dino_momentum(total)
    assert [s.per_step(i + 1) for i in range(total)] == pytest.approx(dino, abs=1e-15)
    assert s.per_step(total + 5) == 1.0


def test_resume_and_torch_ema_agree_with_the_definition():
    values = _values(20)
    model = torch.nn.Linear(5, 1, bias=False).double()
    ema = polyak.EMA(model, schedules.polynomial(1.0), update_every=2)
    for v in values[:9]:
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(v)[None])
        ema.update()
    resumed = polyak.EMA(copy.deepcopy(model), schedules.polynomial(1.0), update_every=2)
    resumed.load_state_dict(copy.deepcopy(ema.state_dict()))
    for v in values[9:]:
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(v)[None])
        ema.update()
        resumed.update(model)
    want = _definition(values, lambda t: t, 2)
    np.testing.assert_allclose(ema.averaged_tensors()["weight"][0], want, rtol=1e-12)
    assert torch.equal(ema.averaged_tensors()["weight"], resumed.averaged_tensors()["weight"])


def test_bad_weights_are_named():
    with pytest.raises(ValueError, match="weight of step 2 is -1"):
        schedules.weighted(lambda t: 1.0 if t == 1 else -1.0)(2)
    with pytest.raises(TypeError, match="not a number"):
        schedules.weighted(lambda t: "x")(1)
    with pytest.raises(ValueError, match="r must be >= 0"):
        schedules.polynomial(-1.0)
    with pytest.raises(ValueError, match=r"lr\(3\)"):
        schedules.lr_weighted(lambda t: -1.0 if t == 3 else 1.0, running_max=False)(3)
    assert schedules.weighted(lambda t: 0.0)(3) == 0.0  # no weight yet: the latest value


@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_k_steps_equals_every_step_on_the_held_stream(case):
    """update_every=k on a stream equals update_every=1 on the stream each update sees: its
    value held over the k steps of the gap."""
    schedule, _ = CASES[case]
    values = _values(30)
    held = [values[min(len(values), (t // 5 + 1) * 5) - 1] for t in range(30)]
    every = _feed(values, copy.deepcopy(schedule), 5)
    step = _feed(held, copy.deepcopy(schedule), 1)
    np.testing.assert_allclose(every, step, rtol=1e-12, atol=1e-12)
