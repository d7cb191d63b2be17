"""polyak.workflows.recompute_bn: brute-force batch statistics, EMA storage, restoring, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.workflows import recompute_bn
from torch_helpers import randomize_

EPS = 1e-5


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4)
    )


def _brute_force_mlp(model, batches):
    """Per-batch mean and unbiased variance of each BN input, by hand in float64, averaged."""
    w1, b1 = model[0].weight.double(), model[0].bias.double()
    g1, c1 = model[1].weight.double(), model[1].bias.double()
    w2, b2 = model[3].weight.double(), model[3].bias.double()
    sums = [[0.0, 0.0], [0.0, 0.0]]
    for x in batches:
        h = x.double() @ w1.T + b1
        mean, var_b = h.mean(0), h.var(0, unbiased=False)
        sums[0][0] = sums[0][0] + mean
        sums[0][1] = sums[0][1] + h.var(0, unbiased=True)
        z = torch.relu((h - mean) / torch.sqrt(var_b + EPS) * g1 + c1) @ w2.T + b2
        sums[1][0] = sums[1][0] + z.mean(0)
        sums[1][1] = sums[1][1] + z.var(0, unbiased=True)
    k = len(batches)
    return [(m / k, v / k) for m, v in sums]


def _loader(n=23, batch=5, seed=1, labels=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen) * 2 + 1
    data = TensorDataset(x, torch.zeros(n)) if labels else TensorDataset(x)
    return DataLoader(data, batch_size=batch), x


def test_matches_brute_force_cumulative_batch_statistics():
    model = _mlp()
    loader, x = _loader()  # 23 rows: batches of 5, 5, 5, 5 and 3 (each batch weighs the same)
    model[1].momentum, model[4].momentum = 0.3, 0.1
    model.eval()
    recompute_bn(model, loader)
    expected = _brute_force_mlp(model, list(x.split(5)))
    for bn, (mean, var) in zip((model[1], model[4]), expected):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
        assert bn.num_batches_tracked.item() == 5
    assert (model[1].momentum, model[4].momentum) == (0.3, 0.1)
    assert not any(m.training for m in model.modules())


def test_batchnorm2d_brute_force_and_num_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, 4, 4, generator=gen) + torch.arange(3.0).view(1, 3, 1, 1)
    batches = list(x.split(4))
    recompute_bn(model, batches, num_batches=2)
    per = [b.double().transpose(0, 1).reshape(3, -1) for b in batches[:2]]
    mean = sum(p.mean(1) for p in per) / 2
    var = sum(p.var(1, unbiased=True) for p in per) / 2
    torch.testing.assert_close(model[0].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[0].running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert model[0].num_batches_tracked.item() == 2


def test_training_flags_restored_per_submodule():
    model = _mlp()
    model.train()
    model[1].eval()
    loader, _ = _loader()
    recompute_bn(model, loader)
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]


def test_batch_layouts_and_custom_forward():
    loader, x = _loader(labels=False)  # (x,) tuples
    ref = _mlp()
    recompute_bn(ref, loader)
    for batches, fwd in [
        (list(x.split(5)), None),  # plain tensors
        ([(b, torch.zeros(len(b))) for b in x.split(5)], None),  # (inputs, target)
        ([{"inp": b} for b in x.split(5)], lambda m, b: m(b["inp"])),  # dicts + forward
    ]:
        model = _mlp()
        recompute_bn(model, batches, forward=fwd)
        torch.testing.assert_close(model[4].running_var, ref[4].running_var)

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, inp):
            return self.net(inp)

    kw = Kw()
    recompute_bn(kw, [{"inp": b} for b in x.split(5)])  # dict -> model(**batch)
    torch.testing.assert_close(kw.net[4].running_var, ref[4].running_var)


def _trained_ema(buffers="average"):
    model = _mlp()
    ema = polyak.EMA(model, decay=0.9, buffers=buffers)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        randomize_(model, gen)
        ema.update()
    return model, ema


def test_on_ema_module_writes_the_average_not_the_live_model():
    model, ema = _trained_ema()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in ema.averaged_tensors().items()}
    loader, x = _loader()
    module = ema.get_module()
    recompute_bn(module, loader)
    after = ema.averaged_tensors()
    for k in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
        assert not torch.equal(after[k], before[k]), k
    assert after["1.num_batches_tracked"].item() == 5
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    for k in ("0.weight", "3.bias"):
        assert torch.equal(after[k], before[k])
    expected = _brute_force_mlp(module, list(x.split(5)))
    torch.testing.assert_close(
        after["4.running_var"].double(), expected[1][1], rtol=1e-5, atol=1e-5
    )
    assert not module.training


def test_inside_swapped_writes_the_average_not_the_live_model():
    model, ema = _trained_ema()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    loader, _ = _loader()
    ref = _mlp()
    ema.copy_to(ref)
    recompute_bn(ref, loader)
    with ema.swapped(model):
        recompute_bn(model, loader)
    avg = ema.averaged_tensors()
    torch.testing.assert_close(avg["1.running_mean"], ref[1].running_mean)
    torch.testing.assert_close(avg["4.running_var"], ref[4].running_var)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_failure_and_empty_loader_leave_statistics_and_momenta_unchanged():
    model, _ = _trained_ema()
    model[1].momentum = 0.2
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    loader, _ = _loader()

    def boom(m, b):
        if boom.calls == 2:
            raise RuntimeError("data error")
        boom.calls += 1
        m(b[0])

    boom.calls = 0
    with pytest.raises(RuntimeError, match="data error"):
        recompute_bn(model, loader, forward=boom)
    with pytest.raises(ValueError, match="no batch"):
        recompute_bn(model, [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert model[1].momentum == 0.2 and model[4].momentum == 0.1


def test_bad_input_is_named():
    model = _mlp()
    loader, _ = _loader()
    with pytest.raises(ValueError, match="num_batches"):
        recompute_bn(model, loader, num_batches=0)
    with pytest.raises(ValueError, match="num_batches"):
        recompute_bn(model, loader, num_batches=1.5)
    with pytest.raises(TypeError, match="forward"):
        recompute_bn(model, loader, forward="yes")
    with pytest.raises(TypeError, match="loader"):
        recompute_bn(model, 3)
    with pytest.raises(TypeError, match="model"):
        recompute_bn(model.state_dict(), loader)
    with pytest.warns(UserWarning, match="no BatchNorm"):
        recompute_bn(nn.Linear(5, 2), loader)
