"""Frozen parameters (requires_grad=False when the EMA is built) are not stored: their average is
themselves. Every read stays complete and equal to the old behaviour (frozen="average"); an
unfrozen one is named; rebind averages it from its live value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import polyak
import reference
from torch_helpers import bn_net, float_state


def frozen_net(seed: int = 0) -> nn.Module:
    """bn_net with its first Linear frozen (a pretrained backbone)."""
    model = bn_net(seed)
    model[0].requires_grad_(False)
    return model


def train_step(model: nn.Module, gen: torch.Generator) -> None:
    """Move the trainable parameters and BN statistics only, as an optimizer step would."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.train()
    model(torch.randn(6, 5, generator=gen))


def test_frozen_parameters_are_not_stored_and_reads_are_complete():
    model = frozen_net()
    live = polyak.EMA(model, decay=0.9)
    old = polyak.EMA(model, decay=0.9, frozen="average")
    assert sorted(live.layout()) == sorted(n for n in old.layout() if not n.startswith("0."))
    frozen_bytes = sum(p.numel() * 4 for p in model[0].parameters())
    assert old.nbytes - live.nbytes >= frozen_bytes  # (storage rows are aligned: padding)
    init, gen, seen = float_state(model), torch.Generator().manual_seed(0), []
    for _ in range(12):
        train_step(model, gen)
        seen.append(float_state(model))
        live.update()
        old.update()
    # the trained tensors against the float64 reference; the frozen ones are the model's
    for name, value in live.averaged_tensors().items():
        if value.is_floating_point():
            exp = reference.ema([s[name] for s in seen], [0.9] * 12, init[name])
            np.testing.assert_allclose(value.double().numpy(), exp, rtol=1e-5, atol=1e-6)
    a, b = live.averaged_state_dict(), old.averaged_state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["0.weight"] is model[0].weight.detach() or torch.equal(a["0.weight"], model[0].weight)
    x = torch.randn(4, 5)
    with live.swapped(model):
        out_live = model.eval()(x)
    with old.swapped(model):
        out_old = model(x)
    assert torch.equal(out_live, out_old)
    assert torch.equal(live.get_module()(x), out_old)
    # copy_to / swapped into another model carry the frozen tensors too
    for ema in (live, old):
        other = bn_net(seed=1)
        ema.copy_to(other)
        for k, v in other.state_dict().items():
            assert torch.equal(v, b[k]), k
    other = bn_net(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with live.swapped(other):
        assert torch.equal(other.eval()(x), out_old)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_copy_into_a_model_whose_frozen_tensor_differs_changes_nothing():
    model = frozen_net()
    ema = polyak.EMA(model, decay=0.9)
    train_step(model, torch.Generator().manual_seed(0))
    ema.update()
    other = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"0\.weight has shape \(6, 5\)"):
        ema.copy_to(other)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_an_unfrozen_parameter_is_named_and_rebind_averages_it_from_then_on():
    model = frozen_net()
    ema = polyak.EMA(model, decay=0.9)
    gen = torch.Generator().manual_seed(0)
    train_step(model, gen)
    ema.update()
    kept = {k: v.clone() for k, v in ema.averaged_tensors().items()}
    model[0].weight.requires_grad_(True)  # progressive unfreezing
    with pytest.raises(polyak.ModelChangedError, match=r"\['0\.weight'\].*ema\.rebind\(\)") as e:
        ema.update()
    assert e.value.added == ["0.weight"] and ema.step == 1
    with pytest.raises(polyak.ModelChangedError, match="0.weight"):
        ema.copy_to(bn_net(seed=1))  # every read sees it too, not only update()
    report = ema.rebind()
    assert report["new"] == ["0.weight"] and "0.bias" not in ema.layout()
    start = model[0].weight.detach().clone()
    for k, v in kept.items():
        assert torch.equal(ema.averaged_tensors()[k], v), k
    train_step(model, gen)
    ema.update()
    expected = 0.9 * start.double() + 0.1 * model[0].weight.detach().double()
    assert torch.allclose(ema.averaged_tensors()["0.weight"].double(), expected, atol=1e-6)


def test_a_parameter_frozen_later_stays_averaged():
    """PEFT's set_adapter freezes the adapter trained so far: its average is kept and moves on
    towards its (now constant) value; rebind keeps it too."""
    model = bn_net()
    ema = polyak.EMA(model, decay=0.5)
    gen = torch.Generator().manual_seed(0)
    train_step(model, gen)
    ema.update()
    model[3].requires_grad_(False)
    ema.update()
    assert "3.weight" in ema.layout()
    assert ema.rebind()["kept"] == list(ema.layout())


def test_all_frozen_is_a_named_error_and_frozen_is_checked():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to average.*frozen='average'"):
        polyak.EMA(model)
    assert polyak.EMA(model, frozen="average").nbytes > 0
    with pytest.raises(ValueError, match="frozen must be one of"):
        polyak.EMA(bn_net(), frozen="skip")  # type: ignore[arg-type]


def test_state_dict_round_trip_without_the_frozen_tensors():
    model = frozen_net()
    ema = polyak.EMA(model, decay=0.9)
    train_step(model, torch.Generator().manual_seed(0))
    ema.update()
    state = ema.state_dict()
    assert not any(k.startswith("0.") for k in state["averages"]["0.9"])
    again = polyak.EMA(model, decay=0.9)
    again.load_state_dict(state)
    for k, v in ema.averaged_tensors().items():
        assert torch.equal(again.averaged_tensors()[k], v)
