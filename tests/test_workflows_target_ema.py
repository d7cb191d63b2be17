"""polyak.workflows.TargetEMA: an EMA kept in a second model, against the float64 loop of the
timeline rules; resume; named errors, all or nothing. (Sharded pairs: tests/test_deepspeed.py.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import polyak
import reference
from polyak.workflows import TargetEMA
from torch_helpers import bn_net, float_state, randomize_


def _run(decay, steps, update_every=1, start_step=0, teacher=None, pair=None, seed=1):
    online, target = pair or (bn_net(0), bn_net(1))
    teacher = teacher or TargetEMA(
        target, online, decay, update_every=update_every, start_step=start_step
    )
    gen = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        randomize_(online, gen)
        seen.append(float_state(online))
        teacher.update()
    return teacher, seen


@pytest.mark.parametrize(
    ("decay", "update_every", "start_step"),
    [(0.8, 1, 0), (polyak.schedules.warmup(0.9), 3, 0), (polyak.schedules.power(gamma=2), 2, 4)],
)
def test_the_target_follows_the_timeline_rules_like_a_float64_loop(decay, update_every, start_step):
    initial = float_state(bn_net(1))
    teacher, seen = _run(decay, 11, update_every, start_step)
    per_step = polyak.schedules.as_schedule(decay).per_step
    got = float_state(teacher.target)
    for k in initial:
        expected = reference.timeline_average(
            [s[k] for s in seen], per_step, initial[k], update_every, start_step
        )
        np.testing.assert_allclose(got[k], expected, rtol=1e-5, atol=1e-6, err_msg=k)
    assert teacher.step == 11 and teacher.timeline.num_updates == 11 // update_every
    copied = teacher.target[1].num_batches_tracked.item()  # copied at the last update
    assert copied == teacher.timeline.last_update_step == 11 - 11 % update_every


def test_a_resumed_teacher_continues_exactly():
    decay = polyak.schedules.warmup(0.9)
    whole, _ = _run(decay, 9, update_every=2)
    first, _ = _run(decay, 5, update_every=2)
    online = bn_net(0)  # a new process: the online weights as they were saved...
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        randomize_(online, gen)
    resumed = TargetEMA(copy.deepcopy(first.target), online, decay, update_every=2)
    resumed.load_state_dict(first.state_dict())  # ...the target's, and the counters
    for _ in range(4):
        randomize_(online, gen)
        resumed.update()
    assert resumed.step == whole.step == 9
    for k, v in whole.target.state_dict().items():
        assert torch.equal(resumed.target.state_dict()[k], v), k


def test_bad_input_is_named_and_changes_nothing():
    online, target = bn_net(0), bn_net(1)
    with pytest.raises(TypeError, match="one average"):
        TargetEMA(target, online, [0.9, 0.99])
    with pytest.raises(ValueError, match=r"3\.weight: target has shape"):
        TargetEMA(torch.nn.Sequential(*target[:3], torch.nn.Linear(7, 4)), online)
    teacher = TargetEMA(target, online, 0.9)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    online[3] = torch.nn.Linear(7, 4)  # the online network changed shape
    with pytest.raises(ValueError, match=r"3\.weight: target has shape \(3, 7\), online has"):
        teacher.update()
    assert teacher.step == 0
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    with pytest.raises(ValueError, match="not a polyak.TargetEMA v1 state dict"):
        teacher.load_state_dict({"format": "polyak.EMA", "version": 1})
    bad = teacher.state_dict()
    bad["timeline"] = {**bad["timeline"], "step": -1}
    with pytest.raises(ValueError, match="step must be >= 0"):
        teacher.load_state_dict(bad)
    assert teacher.step == 0
