"""polyak.workflows.train_with_ema on scikit-learn's digits and diabetes: history, weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.cli.study.data import load_diabetes, load_digits
from polyak.workflows import EarlyStopping, evaluate, recompute_bn, train_with_ema


@pytest.fixture(scope="module")
def digits():
    ds = load_digits(seed=0)
    train = TensorDataset(torch.from_numpy(ds.x_train[:600]), torch.from_numpy(ds.y_train[:600]))
    val = TensorDataset(torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test))
    return train, val


def _loaders(digits, batch_size=64, shuffle=True):
    train, val = digits
    gen = torch.Generator().manual_seed(0)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=shuffle, generator=gen),
        DataLoader(val, batch_size=200),
    )


def _net(bn=True, seed=0):
    torch.manual_seed(seed)
    norm = nn.BatchNorm1d(32) if bn else nn.Identity()
    return nn.Sequential(nn.Linear(64, 32), norm, nn.ReLU(), nn.Linear(32, 10))


def _run(digits, *, lr=0.2, epochs=3, batch_size=64, bn=True, **kwargs):
    model = _net(bn)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    train, val = _loaders(digits, batch_size)
    history = train_with_ema(
        model, train, val, opt, nn.CrossEntropyLoss(), epochs, progress=False, **kwargs
    )
    return model, history, (train, val, opt)


def _same(model, tensors):
    return all(torch.equal(t, tensors[k]) for k, t in model.state_dict().items())


def test_history_keys_and_shapes(digits):
    _, h, _ = _run(digits, ema_decay=0.9, metrics={"accuracy": polyak.metrics.accuracy})
    assert set(h) == {
        "epoch", "steps", "lr", "train_loss",
        "val_loss", "val_loss_ema", "val_accuracy", "val_accuracy_ema",
    }  # fmt: skip
    assert all(len(v) == 3 for v in h.values())
    assert h["epoch"] == [1, 2, 3] and h["steps"] == [10, 20, 30]  # 600 rows / 64 = 10 steps
    assert h["lr"] == [0.2] * 3
    assert all(0 < v < 3 for v in h["train_loss"] + h["val_loss"] + h["val_loss_ema"])
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert all(0 <= a <= 1 for a in h["val_accuracy"] + h["val_accuracy_ema"])


def test_ema_loss_is_computed_from_the_averaged_weights(digits):
    model = _net()
    ema = polyak.EMA(model, decay=0.95)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    train, val = _loaders(digits)
    ce = nn.CrossEntropyLoss()
    h = train_with_ema(model, train, val, opt, ce, 2, ema=ema, final_weights="live")
    assert abs(h["val_loss_ema"][-1] - h["val_loss"][-1]) > 1e-3
    assert evaluate(model, val, ce) == pytest.approx(h["val_loss"][-1], rel=1e-6)
    assert evaluate(ema.get_module(), val, ce) == pytest.approx(h["val_loss_ema"][-1], rel=1e-6)
    with ema.swapped(model):
        assert evaluate(model, val, ce) == pytest.approx(h["val_loss_ema"][-1], rel=1e-6)
    assert ema.step == 20


def test_model_ends_with_the_requested_weights(digits):
    avg_model, h_avg, _ = _run(digits, ema_decay=0.9)
    live_model, h_live, _ = _run(digits, ema_decay=0.9, final_weights="live")
    assert h_avg == h_live  # same seeds: same run, only the final weights differ
    _, val = _loaders(digits)
    ce = nn.CrossEntropyLoss()
    assert evaluate(avg_model, val, ce) == pytest.approx(h_avg["val_loss_ema"][-1], rel=1e-6)
    assert evaluate(live_model, val, ce) == pytest.approx(h_live["val_loss"][-1], rel=1e-6)
    assert not torch.equal(avg_model[0].weight, live_model[0].weight)

    model = _net()
    ema = polyak.EMA(model, decay=[0.8, 0.95])
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    train, val = _loaders(digits)
    h = train_with_ema(model, train, val, opt, ce, 2, ema=ema, final_weights="0.95")
    assert {"val_loss_ema[0.8]", "val_loss_ema[0.95]"} <= set(h)
    assert h["val_loss_ema"] == h["val_loss_ema[0.8]"]  # the first average, as final_weights
    assert h["val_loss_ema[0.8]"] != h["val_loss_ema[0.95]"]
    assert _same(model, ema.averaged_tensors("0.95"))
    assert not _same(model, ema.averaged_tensors("0.8"))


def test_best_weights_from_early_stopping(digits):
    stopper = EarlyStopping(patience=None, monitor="val_loss")
    model, h, _ = _run(digits, ema_decay=0.9, early_stopping=stopper, final_weights="best")
    assert _same(model, stopper.best_state)
    label = stopper.best_which
    key = "val_loss" if label == "live" else f"val_loss_{label}"
    assert (
        stopper.best_value
        == min(h["val_loss"] + h["val_loss_ema"])
        == h[key][stopper.best_epoch - 1]
    )
    _, val = _loaders(digits)
    assert evaluate(model, val, nn.CrossEntropyLoss()) == pytest.approx(
        stopper.best_value, rel=1e-6
    )


def test_early_stopping_stops_training(digits):
    stopper = EarlyStopping(patience=1, min_delta=100.0)  # nothing after epoch 1 can improve
    _, h, _ = _run(digits, epochs=10, early_stopping=stopper)
    assert h["epoch"] == [1, 2] and stopper.stopped_epoch == 2


def test_accumulation_updates_the_average_once_per_optimizer_step(digits):
    steps = []
    model = _net(bn=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_post_hook(lambda *_: steps.append(1))
    ema = polyak.EMA(model, decay=0.9)
    train, val = _loaders(digits, batch_size=16)  # 600 rows: 37 full batches and one of 8
    h = train_with_ema(
        model, train, val, opt, nn.CrossEntropyLoss(), 2, ema=ema, accumulation_steps=4
    )
    assert len(steps) == ema.step == ema.timeline.num_updates == 2 * 10  # ceil(38 / 4) per epoch
    assert h["steps"] == [10, 20]


def test_accumulation_equals_the_large_batch(digits):
    """Micro-batches of 16 accumulated 4 times == batches of 64 (incl. the short last group)."""
    outs = []
    for batch_size, k in [(16, 4), (64, 1)]:
        model = _net(bn=False)
        ema = polyak.EMA(model, decay=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train, val = _loaders(digits, batch_size, shuffle=False)
        train_with_ema(
            model, train, val, opt, nn.CrossEntropyLoss(), 2,
            ema=ema, accumulation_steps=k, final_weights="live",
        )  # fmt: skip
        outs.append((model.state_dict(), ema.averaged_tensors()))
    for (live_a, avg_a), (live_b, avg_b) in [outs]:
        for key in live_a:
            torch.testing.assert_close(live_a[key], live_b[key], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(avg_a[key], avg_b[key], rtol=1e-4, atol=1e-5)


def test_schedulers_step_per_epoch_or_per_step(digits):
    def run(interval):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        train, val = _loaders(digits)
        return train_with_ema(
            model, train, val, opt, nn.CrossEntropyLoss(), 2,
            scheduler=sched, scheduler_interval=interval, progress=False,
        )  # fmt: skip

    assert run("epoch")["lr"] == [0.1, 0.05]
    assert run("step")["lr"] == pytest.approx([0.1 * 0.5**10, 0.1 * 0.5**20])


def test_recompute_bn_before_evaluation_leaves_the_average_and_training_alone(digits):
    runs = {}
    fixed = DataLoader(digits[0], batch_size=100)  # no shuffling: a reproducible pass
    for flag in (False, True, fixed):
        model = _net()
        ema = polyak.EMA(model, decay=0.98)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        train, val = _loaders(digits)
        h = train_with_ema(
            model, train, val, opt, nn.CrossEntropyLoss(), 2,
            ema=ema, recompute_bn=flag, progress=False,
        )  # fmt: skip
        runs["fixed" if flag is fixed else flag] = (model, ema, h)
    (_, ema0, h0), (_, ema1, h1), (m2, ema2, h2) = runs[False], runs[True], runs["fixed"]
    # the pass over the shuffling training loader did not change the training that followed
    assert h0["val_loss"] == h1["val_loss"] == h2["val_loss"]
    assert abs(h0["val_loss_ema"][-1] - h1["val_loss_ema"][-1]) > 1e-4  # recomputing mattered
    for k, v in ema0.averaged_tensors().items():  # evaluating did not change the average
        assert torch.equal(v, ema1.averaged_tensors()[k]), k
        assert torch.equal(v, ema2.averaged_tensors()[k]), k
    reference = _net()
    ema2.copy_to(reference)
    recompute_bn(reference, fixed)  # the final model: the average, statistics recomputed
    assert not torch.equal(m2[1].running_var, ema2.averaged_tensors()["1.running_var"])
    for k, v in m2.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k
    _, val = _loaders(digits)
    assert evaluate(m2, val, nn.CrossEntropyLoss()) == pytest.approx(h2["val_loss_ema"][-1])


def test_global_rng_dict_batches_custom_forward_and_plateau(digits):
    """Dropout and a generator-less shuffling loader draw from torch's global RNG: the BN pass
    must not shift it. Dict batches go through forward=; ReduceLROnPlateau gets the val loss."""
    train, val = digits

    def collate(rows):
        return {"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])}

    def fwd(model, batch):
        return model(batch["x"]), batch["y"]

    runs = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
        loader = DataLoader(train, batch_size=64, shuffle=True, collate_fn=collate)
        h = train_with_ema(
            model, loader, DataLoader(val, batch_size=200, collate_fn=collate), opt,
            nn.CrossEntropyLoss(), 5, ema_decay=0.9, recompute_bn=flag, scheduler=sched,
            forward=fwd, progress=False,
        )  # fmt: skip
        runs.append(h)
    assert runs[0]["val_loss"] == runs[1]["val_loss"]
    assert runs[0]["val_loss_ema"] != runs[1]["val_loss_ema"]
    expected, best = [0.2, 0.2], runs[0]["val_loss"][0]  # patience 0: halve if no improvement
    for loss in runs[0]["val_loss"][1:-1]:
        expected.append(expected[-1] if loss < best * (1 - 1e-4) else expected[-1] / 2)
        best = min(best, loss)
    assert runs[0]["lr"] == pytest.approx(expected)


def test_regression_on_diabetes_and_progress_bar(capsys):
    ds = load_diabetes(seed=0)
    train = DataLoader(
        TensorDataset(torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)[:, None]),
        batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    val = DataLoader(
        TensorDataset(torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)[:, None]),
        batch_size=50,
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    h = train_with_ema(model, train, val, opt, nn.MSELoss(), 2, ema_decay=0.9, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "[" in err and "val_loss" in err
    assert len(h["val_loss_ema"]) == 2 and h["val_loss"][-1] < 1.5
    train_with_ema(model, train, val, opt, nn.MSELoss(), 1, ema_decay=0.9)  # not a terminal
    assert capsys.readouterr().err == ""


def test_bad_input_is_named(digits):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, val = _loaders(digits)
    ce = nn.CrossEntropyLoss()

    params_before = [p.clone() for p in model.parameters()]
    for kwargs, err, match in [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"accumulation_steps": 0}, ValueError, "accumulation_steps"),
        ({"final_weights": "ema"}, ValueError, "final_weights"),
        ({"final_weights": "best"}, ValueError, "early_stopping"),
        ({"early_stopping": EarlyStopping(2, monitor="val_acc")}, ValueError, "val_acc"),
        ({"early_stopping": "yes"}, TypeError, "early_stopping"),
        ({"ema": polyak.EMA(model), "ema_decay": 0.9}, ValueError, "either ema="),
        ({"ema": 0.99}, TypeError, "ema must be"),
        ({"scheduler_interval": "batch"}, ValueError, "scheduler_interval"),
        ({"scheduler": 3}, TypeError, "scheduler"),
        ({"bn_batches": -1}, ValueError, "bn_batches"),
        ({"metrics": {"loss": polyak.metrics.accuracy}}, ValueError, "'loss'"),
        ({"recompute_bn": 5}, TypeError, "recompute_bn"),
        ({"ema_decay": 1.5}, ValueError, "1.5"),
    ]:
        args = {"epochs": 1, **kwargs}
        epochs = args.pop("epochs")
        with pytest.raises(err, match=match):
            train_with_ema(model, train, val, opt, ce, epochs, progress=False, **args)
    with pytest.raises(TypeError, match="optimizer"):
        train_with_ema(model, train, val, "sgd", ce, 1)
    with pytest.raises(ValueError, match="no target"):
        train_with_ema(model, [torch.randn(4, 64)], val, opt, ce, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))
    with pytest.warns(UserWarning, match="no BatchNorm"):
        train_with_ema(_net(bn=False), train, val, opt, ce, 1, recompute_bn=True, progress=False)


class _NanAt:
    """Cross-entropy whose loss is nan at the given (1-based) training call (evaluation runs
    without gradients and is not counted), as an exploding run's is."""

    def __init__(self, call: int) -> None:
        self.call, self.calls = call, 0

    def __call__(self, outputs, target):
        self.calls += torch.is_grad_enabled()
        loss = nn.functional.cross_entropy(outputs, target)
        return loss * float("nan") if self.calls == self.call else loss


def _nan_run(digits, nonfinite_loss, **kwargs):
    model = _net(bn=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    train, val = _loaders(digits)
    ema = polyak.EMA(model, 0.9)
    history = train_with_ema(
        model, train, val, opt, _NanAt(13), 3, ema=ema, progress=False,
        nonfinite_loss=nonfinite_loss, final_weights="live", **kwargs,
    )  # fmt: skip
    return model, ema, history


def test_a_non_finite_loss_stops_training_with_the_last_finite_weights(digits):
    """10 batches per epoch: the 13th loss (epoch 2, batch 3) is nan; 12 steps were taken."""
    with pytest.warns(UserWarning, match="batch 3 of epoch 2 is not finite.*step 12"):
        model, ema, history = _nan_run(digits, "stop")
    assert history["epoch"] == [1, 2] and history["steps"] == [10, 12]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not ema.nonfinite_tensors()
    # the same run with the 13th batch never reached: 12 steps of the same stream
    ref = _net(bn=False)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    ref_ema = polyak.EMA(ref, 0.9)
    train, _ = _loaders(digits)
    batches = [b for _ in range(2) for b in train][:12]
    for x, y in batches:
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_ema.update()
    assert _same(model, ref.state_dict())
    for k, v in ema.averaged_tensors().items():
        assert torch.equal(v, ref_ema.averaged_tensors()[k])


def test_a_non_finite_loss_can_raise_or_be_trained_on(digits):
    with pytest.raises(polyak.NonFiniteError, match="batch 3 of epoch 2"):
        _nan_run(digits, "raise")
    model, _, history = _nan_run(digits, "continue")
    assert len(history["epoch"]) == 3
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the old behaviour
    with pytest.raises(ValueError, match="nonfinite_loss must be one of"):
        _nan_run(digits, "skip")
