"""polyak.workflows.soft_update_ / hard_update_: both conventions, names, buffers, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from polyak.workflows import hard_update_, soft_update_
from torch_helpers import bn_net, randomize_


def _pair(seed=0):
    online = bn_net(seed)
    target = copy.deepcopy(online)
    randomize_(online, torch.Generator().manual_seed(seed + 1), scale=0.5)
    return target, online


def _f64(model):
    return {k: v.detach().double().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("kwargs", "w"),
    [({"tau": 0.005}, 0.005), ({"online_weight": 0.3}, 0.3), ({"decay": 0.99}, 0.01)],
)
def test_matches_the_formula_in_both_conventions(kwargs, w):
    target, online = _pair()
    t0, o = _f64(target), _f64(online)
    ptrs = {k: v.data_ptr() for k, v in target.state_dict().items()}
    assert soft_update_(target, online, **kwargs) is target
    for k, v in target.state_dict().items():
        assert v.data_ptr() == ptrs[k]  # in place
        if v.is_floating_point():
            expected = (1 - w) * t0[k] + w * o[k]  # RL: tau*online + (1-tau)*target
            torch.testing.assert_close(v.double(), expected, rtol=1e-6, atol=1e-7)
        else:  # num_batches_tracked: copied
            assert v.item() == o[k].item() != t0[k].item()


def test_tau_and_decay_are_complements_and_repeat_like_an_ema():
    a_t, online = _pair()
    b_t = copy.deepcopy(a_t)
    for _ in range(20):
        soft_update_(a_t, online, tau=0.1)
        soft_update_(b_t, online, decay=0.9)
    t0 = _f64(_pair()[0])
    for k, v in a_t.state_dict().items():
        torch.testing.assert_close(v, b_t.state_dict()[k], rtol=1e-6, atol=1e-6)
        if v.is_floating_point():  # 20 updates towards a fixed online net: 0.9**20 of the gap
            expected = _f64(online)[k] + 0.9**20 * (t0[k] - _f64(online)[k])
            torch.testing.assert_close(v.double(), expected, rtol=1e-5, atol=1e-6)


def test_buffer_policies_and_extremes():
    target, online = _pair()
    t0 = _f64(target)
    soft_update_(target, online, tau=0.5, buffers="ignore")
    assert torch.equal(target[1].running_mean.double(), t0["1.running_mean"])
    assert target[1].num_batches_tracked.item() == online[1].num_batches_tracked.item()
    soft_update_(target, online, tau=0.5, buffers="copy")
    assert torch.equal(target[1].running_var, online[1].running_var)
    before = _f64(target)
    soft_update_(target, online, online_weight=0.0)
    assert all(torch.equal(v.double(), before[k]) for k, v in target.state_dict().items())
    soft_update_(target, online, tau=1.0)
    assert all(torch.equal(v, online.state_dict()[k]) for k, v in target.state_dict().items())


def test_hard_update_copies_everything_or_leaves_buffers():
    target, online = _pair()
    t0 = _f64(target)
    hard_update_(target, online, buffers="ignore")
    assert torch.equal(target[0].weight, online[0].weight)
    assert torch.equal(target[1].running_mean.double(), t0["1.running_mean"])
    assert hard_update_(target, online) is target
    for k, v in target.state_dict().items():
        assert torch.equal(v, online.state_dict()[k]), k
    with pytest.raises(ValueError, match="buffers"):
        hard_update_(target, online, buffers="average")


class _Compiled(nn.Module):  # what torch.compile returns: `_orig_mod.` prefixes every name
    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner


def test_matches_by_canonical_name_through_wrappers():
    target, online = _pair()
    wrapped = _Compiled(online)
    assert next(iter(wrapped.state_dict())).startswith("_orig_mod.")
    expected = copy.deepcopy(target)
    soft_update_(expected, online, tau=0.25)
    soft_update_(target, wrapped, tau=0.25)
    for k, v in target.state_dict().items():
        assert torch.equal(v, expected.state_dict()[k]), k


def test_other_dtype_target_follows_the_formula():
    target, online = _pair()
    target = target.double()
    t0, o = _f64(target), _f64(online)
    soft_update_(target, online, tau=0.2)
    for k in ("0.weight", "1.running_var"):
        torch.testing.assert_close(target.state_dict()[k], 0.8 * t0[k] + 0.2 * o[k])


def test_bad_input_is_named_and_changes_nothing():
    target, online = _pair()
    t0 = _f64(target)
    with pytest.raises(TypeError, match="exactly one"):
        soft_update_(target, online)
    with pytest.raises(TypeError, match="exactly one"):
        soft_update_(target, online, tau=0.1, decay=0.9)
    with pytest.raises(TypeError, match="positional"):
        soft_update_(target, online, 0.1)  # which convention? refused
    with pytest.raises(ValueError, match="tau must be a number in"):
        soft_update_(target, online, tau=1.5)
    with pytest.raises(TypeError, match="decay must be a number"):
        soft_update_(target, online, decay=True)
    with pytest.raises(ValueError, match="same module"):
        soft_update_(online, online, tau=0.1)
    shared = copy.copy(online)  # a shallow copy shares every tensor
    shared._modules = dict(online._modules)
    with pytest.raises(ValueError, match="share"):
        soft_update_(shared, online, tau=0.1)
    wider = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 4))
    with pytest.raises(ValueError, match=r"3\.weight: target has shape \(4, 7\)"):
        soft_update_(wider, online, tau=0.1)
    with pytest.raises(ValueError, match=r"does not match the target: missing \['2\.weight'"):
        soft_update_(nn.Sequential(*online[:2], nn.Linear(7, 7), nn.Linear(7, 3)), online, tau=0.1)
    with pytest.raises(TypeError, match="online must be"):
        soft_update_(target, online.state_dict(), tau=0.1)
    for k, v in target.state_dict().items():
        assert torch.equal(v.double(), t0[k]), k
