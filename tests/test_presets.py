"""Presets reproduce their papers; horizon conversions are consistent with the schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

import polyak
import reference
from polyak import presets, schedules


def test_morales_brotons_decays_counted_per_ema_update():
    kw = presets.morales_brotons()
    ema = polyak.ArrayEMA(np.zeros(3), **kw)
    x = np.random.default_rng(0).normal(size=(16 * 300, 3))
    seen = {n: [] for n in ema.names}
    for t, v in enumerate(x, start=1):
        ema.update(v)
        if t % 16 == 0:
            for n, d in ema.timeline.last_decays.items():
                seen[n].append(d)
    for alpha, name in zip(presets.MORALES_BROTONS_DECAYS, ema.names):
        expected = [min(alpha, (s + 1) / (s + 10)) for s in range(300)]  # s from 0 per update
        np.testing.assert_allclose(seen[name], expected, rtol=1e-12)
        ref = reference.ema(x[15::16], expected, np.zeros(3))
        np.testing.assert_allclose(ema.get(name), ref, rtol=1e-10)


def test_morales_brotons_reaches_cap_only_after_4490_updates():
    sched = presets.morales_brotons()["decay"]["0.998"]
    s = 4490  # (s+1)/(s+10) >= 0.998  <=>  0.002 s >= 8.98  <=>  s >= 4490 (0-based)
    assert sched(16 * s, 16) < 0.998 and sched(16 * (s + 1), 16) == pytest.approx(0.998)


def test_edm2_preset():
    d = presets.edm2()["decay"]
    assert [s.gamma for s in d.values()] == pytest.approx([16.97, 6.94], abs=0.01)


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.9999])
def test_sigma_rel_of_constant_decay(decay):
    steps = 10**6
    s = schedules.decay_to_sigma_rel(decay, steps)
    assert schedules.sigma_rel_to_decay(s, steps) == pytest.approx(decay, rel=1e-12)
    # brute force: std of the age distribution of the weights, over a long run
    k = np.arange(200_000)
    w = (1 - decay) * decay**k
    w /= w.sum()
    std = math.sqrt((w * k**2).sum() - (w * k).sum() ** 2)
    assert s == pytest.approx(std / steps, rel=1e-3)
    assert schedules.decay_to_halflife(decay) == pytest.approx(math.log(0.5) / math.log(decay))


def test_conversion_errors():
    with pytest.raises(ValueError, match="decay"):
        schedules.decay_to_sigma_rel(1.0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.sigma_rel_to_decay(0.1, 0)
