"""polyak.workflows.ensemble_predictions: mean of softmaxes, state dicts in a template, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.workflows import ensemble_predictions


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def _members(k=3):
    nets = [_net(s) for s in range(k)]
    gen = torch.Generator().manual_seed(9)
    for net in nets:  # distinct BN statistics: eval mode must use them
        net[1].running_mean.normal_(generator=gen)
        net[1].running_var.uniform_(0.5, 2.0, generator=gen)
    return nets


def _data(n=11):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return x, y, DataLoader(TensorDataset(x, y), batch_size=4)


def _by_hand(nets, x):
    with torch.no_grad():
        probs = []
        for net in nets:
            net.eval()
            z = net(x).double()
            e = torch.exp(z - z.max(1, keepdim=True).values)
            probs.append(e / e.sum(1, keepdim=True))
            net.train()
    return sum(probs) / len(probs)


def test_equals_the_hand_computed_mean_of_softmaxes():
    nets = _members()
    x, y, loader = _data()
    probs, targets = ensemble_predictions(nets, loader)
    assert probs.dtype == torch.float32 and probs.shape == (11, 3)
    torch.testing.assert_close(probs.double(), _by_hand(nets, x), rtol=1e-6, atol=1e-7)
    assert torch.equal(targets, y)
    assert all(net.training for net in nets)  # modes given back
    single, _ = ensemble_predictions(nets[:1], loader)
    assert not torch.allclose(single, probs, atol=1e-3)  # members do differ


def test_state_dicts_in_a_template_match_modules_and_leave_the_template_alone():
    nets = _members()
    x, _, loader = _data()
    template = _net(42)
    before = {k: v.clone() for k, v in template.state_dict().items()}
    params = list(template.parameters())
    states = [nets[0].state_dict(), {f"module.{k}": v for k, v in nets[1].state_dict().items()}]
    states.append(nets[2])  # modules and state dicts mix
    probs, _ = ensemble_predictions(states, loader, model=template)
    torch.testing.assert_close(probs.double(), _by_hand(nets, x), rtol=1e-6, atol=1e-7)
    for k, v in template.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert list(template.parameters()) == params


def test_ema_averages_as_members_and_transforms():
    nets = _members(2)
    x, _, loader = _data()
    ema = polyak.EMA(nets[0], decay=0.5)
    probs, _ = ensemble_predictions([ema.averaged_tensors(), nets[1]], loader, model=_net(7))
    torch.testing.assert_close(probs.double(), _by_hand(nets, x), rtol=1e-6, atol=1e-7)
    raw, _ = ensemble_predictions(nets, loader, transform="identity")
    with torch.no_grad():
        for n in nets:
            n.eval()
        mean = (nets[0](x) + nets[1](x)) / 2
    torch.testing.assert_close(raw, mean, rtol=1e-5, atol=1e-6)
    doubled, _ = ensemble_predictions(nets, loader, transform=lambda z: 2 * z)
    torch.testing.assert_close(doubled, 2 * raw)


def test_unlabeled_batches_give_no_targets():
    nets = _members(2)
    x, _, _ = _data()
    probs, targets = ensemble_predictions(nets, [x[:6], x[6:]])
    assert targets is None and probs.shape == (11, 3)


def test_bad_input_is_named():
    nets = _members(2)
    x, y, loader = _data()
    with pytest.raises(ValueError, match="empty"):
        ensemble_predictions([], loader)
    with pytest.raises(TypeError, match="sequence"):
        ensemble_predictions(nets[0], loader)
    with pytest.raises(TypeError, match="member 1 is a state dict"):
        ensemble_predictions([nets[0], nets[1].state_dict()], loader)
    with pytest.raises(TypeError, match="member 1 is a str"):
        ensemble_predictions([nets[0], "ckpt.pt"], loader)
    bad = dict(nets[1].state_dict())
    bad["3.weight"] = torch.zeros(3, 9)
    with pytest.raises(ValueError, match=r"member 1: 3\.weight has shape \(3, 9\)"):
        ensemble_predictions([nets[0], bad], loader, model=_net(1))
    del bad["3.weight"]
    with pytest.raises(ValueError, match=r"missing \['3\.weight'\]"):
        ensemble_predictions([bad], loader, model=_net(1))
    with pytest.raises(ValueError, match="transform"):
        ensemble_predictions(nets, loader, transform="log_softmax")
    shuffled = DataLoader(
        TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    with pytest.raises(ValueError, match="must not shuffle"):
        ensemble_predictions(nets, shuffled)
    with pytest.raises(ValueError, match="no batch"):
        ensemble_predictions(nets, [])
