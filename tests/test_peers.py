"""Differential tests against peer libraries, and each peer bug in scope."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

import polyak
from peers import timm_model_ema
from polyak import schedules
from torch_helpers import bn_net, randomize_

pytestmark = pytest.mark.slow  # differential tests against the peer libraries

STEPS = 25


def drive(model, updates, steps=STEPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        randomize_(model, gen)
        for u in updates:
            u()


def assert_params_close(ours: dict, theirs: dict, atol=1e-6):
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v.to(ours[k].dtype), rtol=0, atol=atol, msg=k)


def test_matches_torch_averaged_model_ema():
    model = bn_net()
    ours = polyak.EMA(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    theirs.update_parameters(model)  # its first call copies: align the starts
    drive(model, [ours.update, lambda: theirs.update_parameters(model)])
    sd = {k: v for k, v in theirs.module.state_dict().items() if v.is_floating_point()}
    assert_params_close(ours.averaged_tensors(), sd)


def test_matches_torch_ema_constant_and_warmup():
    import torch_ema

    for use_num_updates, decay in [(False, 0.9), (True, schedules.warmup(0.99))]:
        model = bn_net()
        ours = polyak.EMA(model, decay, buffers="ignore")
        theirs = torch_ema.ExponentialMovingAverage(
            model.parameters(),
            decay=0.9 if not use_num_updates else 0.99,
            use_num_updates=use_num_updates,
        )
        drive(model, [ours.update, theirs.update])
        names = [n for n, _ in model.named_parameters()]
        assert_params_close(ours.averaged_tensors(), dict(zip(names, theirs.shadow_params)))


def test_matches_ema_pytorch_inverse_power_warmup():
    from ema_pytorch import EMA as LucidEMA

    model = bn_net()
    ours = polyak.EMA(model, schedules.inverse_power(0.999, inv_gamma=1.0, power=2 / 3))
    theirs = LucidEMA(
        model,
        beta=0.999,
        update_after_step=0,
        update_every=1,
        inv_gamma=1.0,
        power=2 / 3,
        include_online_model=False,
    )
    # its first update() copies the model; our first update has decay 0 (also a copy)
    drive(model, [ours.update, theirs.update])
    sd = {k: v for k, v in theirs.ema_model.state_dict().items() if v.is_floating_point()}
    assert_params_close(ours.averaged_tensors(), sd)


def test_matches_timm_model_ema_v3():
    timm_ema = timm_model_ema()
    if timm_ema is None:
        pytest.skip("timm's model_ema.py could not be loaded (reason printed)")
    model = bn_net()
    ours = polyak.EMA(model, 0.95)
    theirs = timm_ema.ModelEmaV3(model, decay=0.95)
    drive(model, [ours.update, lambda: theirs.update(model)])
    sd = theirs.module.state_dict()
    assert_params_close(ours.averaged_tensors(), {k: v for k, v in sd.items()})


def test_matches_diffusers_ema_model_warmup():
    from diffusers.training_utils import EMAModel

    model = bn_net()
    gen = torch.Generator().manual_seed(1)
    theirs = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=False)
    randomize_(model, gen)
    theirs.step(model.parameters())  # diffusers' first step copies (decay 0)...
    ours = polyak.EMA(model, schedules.warmup(0.99), buffers="ignore")  # ...like our start
    for _ in range(STEPS):
        randomize_(model, gen)
        theirs.step(model.parameters())
        ours.update()
    names = [n for n, _ in model.named_parameters()]
    assert_params_close(ours.averaged_tensors(), dict(zip(names, theirs.shadow_params)))


# ---------------------------------------------------------------- peer bugs polyak must not have


def test_bf16_model_average_does_not_freeze():
    """torch's AveragedModel keeps a bf16 model's average in bf16 (torch/optim/swa_utils.py):
    at decay 0.9999 every update is below half an ulp, and it never moves from 1.0 to 1.5."""
    model = nn.Linear(8, 8, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ours = polyak.EMA(model, 0.9999)
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9999))
    peer.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(1.5)
    for _ in range(2000):
        ours.update()
        peer.update_parameters(model)
    assert torch.all(peer.module.weight == 1.0)  # torch 2.13's AveragedModel: frozen
    exact = 1.5 - 0.5 * 0.9999**2000  # 1.0906...
    assert (ours.averaged_tensors()["weight"].double() - exact).abs().max() < 1e-6


def test_integer_buffers_are_copied_not_averaged_and_truncated():
    model = bn_net()
    peer = AveragedModel(model, avg_fn=get_ema_avg_fn(0.9), use_buffers=True)
    ours = polyak.EMA(model, 0.9)
    x = torch.randn(16, 5)
    for _ in range(20):
        model.train()(x)
        peer.update_parameters(model)
        ours.update()
    assert model[1].num_batches_tracked.item() == 20
    assert peer.module[1].num_batches_tracked.item() < 20  # averaged, then truncated
    assert ours.averaged_tensors()["1.num_batches_tracked"].item() == 20


def test_orig_mod_prefix_never_skips_updates():
    """wandb/senpai PR #2899: names from a compiled model did not match -> EMA never updated."""
    model = bn_net()
    ours = polyak.EMA(torch.compile(model, backend="eager"), 0.0)
    randomize_(model, torch.Generator().manual_seed(0))
    ours.update(model)  # the uncompiled module, as a training loop may pass it
    assert torch.equal(ours.averaged_tensors()["0.weight"], model[0].weight)


def test_fp32_average_of_bf16_model_survives_a_state_dict_round_trip():
    import torch_ema

    model = bn_net().to(torch.bfloat16)
    peer = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.99)
    peer.to(dtype=torch.float32)
    peer.load_state_dict(peer.state_dict())
    assert peer.shadow_params[0].dtype == torch.bfloat16  # torch_ema 0.3 casts back: lost
    ours = polyak.EMA(model, 0.99)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    ours.load_state_dict(torch.load(buf, weights_only=True))
    assert ours.averaged_tensors()["0.weight"].dtype == torch.float32


def test_no_training_step_lands_on_swapped_weights():
    model = bn_net()
    ours = polyak.EMA(model, 0.9)
    with ours.swapped(model), pytest.raises(RuntimeError, match="swapped"):
        ours.update()
    with ours.swapped(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.state_dict()
    assert any("saves the average" in str(w.message) for w in caught)


def test_update_every_keeps_the_horizon_unlike_ema_pytorch():
    """ema-pytorch applies beta unchanged every `update_every` calls: the lag grows ~k-fold."""
    from ema_pytorch import EMA as LucidEMA

    def lag(make_update, k):
        w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        model = nn.ParameterList([w])
        update = make_update(model, k)
        for t in range(1, 3001):
            with torch.no_grad():
                w.fill_(float(t))
            update()
        return 3000 - update.value()

    def ours(model, k):
        ema = polyak.EMA(model, 0.99, update_every=k)
        return _Call(ema.update, lambda: ema.averaged_tensors()["0"].item())

    def lucid(model, k):
        ema = LucidEMA(
            model,
            beta=0.99,
            update_after_step=0,
            update_every=k,
            inv_gamma=1e-12,
            include_online_model=False,
        )
        return _Call(ema.update, lambda: ema.ema_model[0].item())

    ours_1, ours_10 = lag(ours, 1), lag(ours, 10)
    lucid_1, lucid_10 = lag(lucid, 1), lag(lucid, 10)
    assert abs(ours_1 - 99) < 1 and abs(ours_10 - ours_1) < 5  # horizon kept (~99 steps)
    assert lucid_10 > 8 * lucid_1  # ema-pytorch: ~10x longer lag


class _Call:
    def __init__(self, update, value):
        self._update, self.value = update, value

    def __call__(self):
        self._update()
