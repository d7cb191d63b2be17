"""polyak.workflows.EarlyStopping: best weights restored exactly, patience, modes, errors."""

from __future__ import annotations

import math

import pytest
import torch

import polyak
from polyak.workflows import Best, EarlyStopping
from torch_helpers import bn_net, randomize_


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_restores_exactly_the_best_weights_of_live_or_average():
    model = bn_net()
    ema = polyak.EMA(model, decay=0.7)
    gen = torch.Generator().manual_seed(0)
    stopper = EarlyStopping(patience=3)
    live_scores = [1.0, 0.8, 0.7, 0.75, 0.72, 0.9]
    ema_scores = [1.1, 0.6, 0.65, 0.62, 0.61, 0.61]  # best: the average at epoch 2
    expected = None
    for epoch, (s_live, s_ema) in enumerate(zip(live_scores, ema_scores), start=1):
        randomize_(model, gen)
        ema.update()
        if epoch == 2:
            expected = {k: v.clone() for k, v in ema.averaged_tensors().items()}
        with ema.swapped(model):  # the average, swapped in: the path train_with_ema takes
            stopper.observe("ema", s_ema, model)
        stopper.observe("live", s_live, model)
        stop = stopper.end_epoch()
        assert stop == (epoch >= 5)
    assert stopper.best == Best(epoch=2, which="ema", value=0.6)
    assert (stopper.best_epoch, stopper.best_which, stopper.best_value) == (2, "ema", 0.6)
    assert stopper.stopped_epoch == 5 and stopper.epochs_without_improvement == 4
    assert stopper.best_by_candidate == {
        "ema": Best(2, "ema", 0.6),
        "live": Best(3, "live", 0.7),
    }
    fresh = bn_net(seed=5)
    assert stopper.restore(fresh) == stopper.best
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k  # bit for bit, buffers included
    assert not torch.equal(model[0].weight, expected["0.weight"])  # training moved on


def test_kept_weights_are_a_copy_reused_across_improvements():
    model = bn_net()
    stopper = EarlyStopping(patience=None)
    stopper.update({"live": 3.0}, {"live": model})
    first = stopper.best_state["0.weight"]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    snap = _state(model)
    stopper.update({"live": 2.0}, {"live": model})
    assert stopper.best_state["0.weight"] is first  # reused, no new allocation
    with torch.no_grad():
        model[0].weight.add_(1.0)  # later training does not reach the copy
    stopper.update({"live": 2.5}, {"live": model})
    assert torch.equal(stopper.best_state["0.weight"], snap["0.weight"])
    assert not stopper.should_stop  # patience=None only tracks


def test_update_on_ema_module_and_history_padding():
    model = bn_net()
    ema = polyak.EMA(model, decay=0.5)
    stopper = EarlyStopping(patience=2, mode="max")
    stopper.update({"live": 0.5}, {"live": model})
    stopper.update({"live": 0.6, "ema": 0.9}, {"live": model, "ema": ema.get_module()})
    stopper.update({"ema": 0.8})
    assert stopper.history["live"] == [0.5, 0.6, pytest.approx(math.nan, nan_ok=True)]
    assert stopper.history["ema"][0] != stopper.history["ema"][0]  # NaN before its first report
    assert stopper.history["ema"][1:] == [0.9, 0.8]
    target = bn_net(seed=3)
    stopper.restore(target)
    avg = ema.averaged_tensors()
    assert all(torch.equal(v, avg[k]) for k, v in target.state_dict().items())


def test_min_delta_mode_and_nan():
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert not stopper.update({"live": 1.0})
    assert not stopper.update({"live": 0.95})  # not better by min_delta
    assert stopper.update({"live": float("nan")})
    assert stopper.best == Best(1, "live", 1.0)
    up = EarlyStopping(patience=1, mode="max")
    up.update({"a": 0.5})
    assert not up.update({"a": 0.6})
    assert up.update({"a": 0.6})  # equal is no improvement
    first_nan = EarlyStopping(patience=5)
    first_nan.update({"live": float("nan")})
    assert first_nan.best is None


def test_restore_errors_are_named():
    model = bn_net()
    stopper = EarlyStopping(patience=3)
    with pytest.raises(RuntimeError, match="no best weights"):
        stopper.restore(model)
    stopper.update({"live": 1.0})  # no model: nothing to restore
    with pytest.raises(RuntimeError, match="no best weights"):
        stopper.restore(model)
    stopper.update({"live": 0.5}, {"live": model})
    other = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
    with pytest.raises(ValueError, match=r"unexpected \['3\.weight', '3\.bias'\]"):
        stopper.restore(other)
    bigger = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    with pytest.raises(ValueError, match=r"0\.weight has shape \(7, 5\)"):
        stopper.restore(bigger)
    no_copy = EarlyStopping(patience=3, keep_weights=False)
    no_copy.update({"live": 0.5}, {"live": model})
    assert no_copy.best_state is None


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(2.5)
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(3, mode="minimum")
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping(3, min_delta=-0.1)
    with pytest.raises(TypeError, match="min_delta"):
        EarlyStopping(3, min_delta="0.1")
    stopper = EarlyStopping(3)
    with pytest.raises(ValueError, match="without any score"):
        stopper.end_epoch()
    stopper.observe("live", 1.0)
    with pytest.raises(ValueError, match="already reported"):
        stopper.observe("live", 0.5)
    with pytest.raises(TypeError, match="must be a number"):
        stopper.observe("ema", "low")
    with pytest.raises(TypeError, match="name"):
        stopper.observe("", 1.0)
    with pytest.raises(ValueError, match=r"models given for \['ema'\]"):
        EarlyStopping(3).update({"live": 1.0}, {"ema": bn_net()})
    with pytest.raises(TypeError, match="scores"):
        EarlyStopping(3).update({})
