"""polyak.workflows.evaluate: size-weighted mean loss, reductions, metrics, modes, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.workflows import evaluate


def _data(n=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 4)


def test_short_last_batch_counts_per_sample_not_per_batch():
    x, y = _data(10)
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches of 4, 4 and 2
    ce = nn.CrossEntropyLoss()
    with torch.no_grad():
        exact = ce(model(x).double(), y).item()
        per_batch = [ce(model(xb), yb).item() for xb, yb in loader]
    biased = sum(per_batch) / len(per_batch)
    got = evaluate(model, loader, ce)
    assert got == pytest.approx(exact, rel=1e-6)
    assert abs(biased - exact) > 1e-3  # the data make the common recipe's bias visible
    assert got != pytest.approx(biased, rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_sum_and_unreduced_criteria_give_the_same_mean(reduction):
    x, y = _data(11)
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    ref = evaluate(model, loader, nn.CrossEntropyLoss())
    assert evaluate(model, loader, nn.CrossEntropyLoss(reduction=reduction)) == pytest.approx(
        ref, rel=1e-6
    )


def test_unreduced_regression_loss_averages_over_features():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 3, generator=gen), torch.randn(9, 2, generator=gen)
    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with torch.no_grad():
        exact = nn.functional.mse_loss(model(x), y).item()
    for crit in (nn.MSELoss(), nn.MSELoss(reduction="none")):
        assert evaluate(model, loader, crit) == pytest.approx(exact, rel=1e-6)


def test_metrics_are_computed_over_the_whole_set():
    x, y = _data(13)
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    out = evaluate(
        model,
        loader,
        nn.CrossEntropyLoss(),
        metrics={"acc": polyak.metrics.accuracy, "n": lambda o, t: len(t)},
    )
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    assert set(out) == {"loss", "acc", "n"}
    assert out["acc"] == pytest.approx(acc) and out["n"] == 13


def test_eval_mode_no_grad_and_flags_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.9), nn.BatchNorm1d(4))
    model.train()
    model[1].eval()  # a submodule with its own flag
    x, y = _data(8)
    loader = DataLoader(TensorDataset(x, y.float().unsqueeze(1).expand(8, 4)), batch_size=3)
    stats = model[2].running_mean.clone()
    a = evaluate(model, loader, nn.MSELoss())
    b = evaluate(model, loader, nn.MSELoss())
    assert a == b  # dropout off, BN in eval mode
    assert torch.equal(model[2].running_mean, stats)
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert all(p.grad is None for p in model.parameters())


def test_custom_forward_for_dict_batches():
    x, y = _data(6)
    model = _model()
    batches = [{"inputs": x[:4], "labels": y[:4]}, {"inputs": x[4:], "labels": y[4:]}]
    got = evaluate(
        model, batches, nn.CrossEntropyLoss(), forward=lambda m, b: (m(b["inputs"]), b["labels"])
    )
    with torch.no_grad():
        assert got == pytest.approx(nn.functional.cross_entropy(model(x), y).item(), rel=1e-6)


def test_bad_input_is_named():
    x, y = _data(4)
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [], ce)
    with pytest.raises(ValueError, match="no target"):
        evaluate(model, [x], ce)
    with pytest.raises(ValueError, match="no target"):
        evaluate(model, [{"input": x}], ce)
    with pytest.raises(TypeError, match="criterion"):
        evaluate(model, loader, "cross_entropy")
    with pytest.raises(TypeError, match="model"):
        evaluate(lambda t: t, loader, ce)
    with pytest.raises(TypeError, match="loader"):
        evaluate(model, x, ce)
    with pytest.raises(ValueError, match="'loss'"):
        evaluate(model, loader, ce, metrics={"loss": polyak.metrics.accuracy})
    with pytest.raises(TypeError, match="metric 'acc'"):
        evaluate(model, loader, ce, metrics={"acc": 3})
    with pytest.raises(TypeError, match="pair"):
        evaluate(model, loader, ce, forward=lambda m, b: m(b[0]))
    with pytest.raises(TypeError, match="batches must be"):
        evaluate(model, [3], ce)
