"""polyak.integrations.lightning.EMACallback with the real Lightning Trainer on CPU."""

from __future__ import annotations

import copy
import csv
import warnings

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

import polyak
import reference
from lightning_helpers import Record, Regression, data, trainer
from polyak.errors import CheckpointError
from polyak.integrations._checkpoint_entry import check_entry, make_entry
from polyak.integrations.lightning import EMACallback

VAL = data(1, batch_size=16, seed=1)  # one batch: the logged loss is one mse


def _equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _live(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _average_model(cb, name=None):
    """A fresh module loaded with an average's tensors: the average evaluated by hand."""
    model = Regression()
    model.load_state_dict(cb.ema.averaged_tensors(name))
    return model.eval()


def _val_loss(model):
    x, y = next(iter(VAL))
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y)


def test_one_update_per_optimizer_step_equals_a_manual_ema_and_the_float64_reference():
    rec, cb = Record(), EMACallback(0.9)
    model = Regression()
    fit = trainer(max_epochs=2, accumulate_grad_batches=3, callbacks=[rec, cb])
    fit.fit(model, data(7))  # 7 micro-batches: steps after 3, 6 and 7 in each epoch
    assert fit.global_step == 6
    assert cb.ema.step == cb.ema.timeline.num_updates == len(rec.states) - 1 == 6

    replay = Regression()  # a manual polyak.EMA updated after each optimizer step
    replay.load_state_dict(rec.states[0])
    manual = polyak.EMA(replay, 0.9)
    for state in rec.states[1:]:
        replay.load_state_dict(state)
        manual.update()
    got = cb.ema.averaged_tensors()
    for k, want in manual.averaged_tensors().items():
        assert torch.equal(got[k], want), k
        if want.is_floating_point():
            expected = reference.ema(
                [s[k].double().numpy() for s in rec.states[1:]], [0.9] * 6, rec.states[0][k]
            )
            np.testing.assert_allclose(got[k].double().numpy(), expected, rtol=1e-5, atol=1e-7)
    assert got["net.1.num_batches_tracked"] == 14  # copied, not averaged


def test_validation_test_predict_use_the_average_and_training_never_sees_it():
    plain = Regression(dropout=0.2)  # dropout: training draws random numbers
    trainer(max_epochs=3).fit(plain, data(4), VAL)
    model, cb = Regression(dropout=0.2), EMACallback(0.8, evaluate="both")
    fit = trainer(max_epochs=3, callbacks=[cb])
    fit.fit(model, data(4), VAL)
    _equal_states(_live(model), _live(plain))  # two validations per epoch, trained as without

    averaged = _average_model(cb)
    assert fit.callback_metrics["val_loss_ema"] == _val_loss(averaged)
    assert not torch.equal(_val_loss(averaged), _val_loss(plain.eval()))
    (tested,) = fit.test(model, VAL, verbose=False)
    assert tested["test_loss_ema"] == _val_loss(averaged).item()
    (predicted,) = fit.predict(model, VAL)  # predict: the average
    with torch.no_grad():
        assert torch.equal(predicted, averaged(next(iter(VAL))[0]))
    _equal_states(_live(model), _live(plain))


def test_no_swap_in_the_sanity_check_or_before_the_first_update():
    rec, cb = Record(), EMACallback(0.5, update_every=2)  # first update at the second step
    model = Regression()
    fit = trainer(max_epochs=1, val_check_interval=1, num_sanity_val_steps=1, callbacks=[rec, cb])
    fit.fit(model, data(3), VAL)
    sanity, step1, step2, step3 = model.seen
    assert sanity[:2] == (True, 0) and torch.equal(sanity[2], rec.states[0]["net.3.weight"])
    # after one step nothing is averaged yet: the live weights, not the initial copy
    assert step1[1] == 1 and torch.equal(step1[2], rec.states[1]["net.3.weight"])
    assert not torch.equal(step1[2], rec.states[0]["net.3.weight"])
    assert step2[1] == 2 and cb.ema.timeline.num_updates == 1
    assert torch.equal(step2[2], cb.ema.averaged_tensors()["net.3.weight"])
    assert not torch.equal(step2[2], rec.states[2]["net.3.weight"])
    assert step3[1] == 3 and torch.equal(step3[2], step2[2])  # not due at step 3


@pytest.mark.parametrize("as_weights", [False, True], ids=["plain", "average_as_weights"])
def test_resume_from_a_checkpoint_is_bit_for_bit(tmp_path, as_weights):
    options = {"decay": polyak.schedules.warmup(0.95), "save_average_as_weights": as_weights}
    whole, cb_whole = Regression(), EMACallback(**options)
    trainer(max_epochs=4, callbacks=[cb_whole]).fit(whole, data(3), VAL)

    first, cb_first = Regression(), EMACallback(**options)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[cb_first, ckpt], enable_checkpointing=True).fit(
        first, data(3), VAL
    )
    path = tmp_path / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    entry = saved["callbacks"][cb_first.state_key]
    if as_weights:  # the average is the weights; the live ones wait in the callback's entry
        _equal_states(saved["state_dict"], cb_first.ema.averaged_tensors())
        _equal_states(entry["live_state_dict"], _live(first))
        _equal_states(_live(Regression.load_from_checkpoint(path)), saved["state_dict"])
    else:
        _equal_states(saved["state_dict"], _live(first))
    assert entry["ema"]["timeline"]["step"] == entry["global_step"] == saved["global_step"] == 6
    assert (entry["format"], entry["version"]) == ("polyak EMACallback", 1)
    (tested,) = trainer(callbacks=[EMACallback(**options)]).test(
        Regression(), VAL, ckpt_path=path, verbose=False
    )  # a fresh callback evaluates the checkpoint's average
    assert tested["test_loss"] == _val_loss(_average_model(cb_first)).item()

    resumed, cb_resumed = Regression(), EMACallback(**options)
    trainer(max_epochs=4, callbacks=[cb_resumed]).fit(resumed, data(3), VAL, ckpt_path=path)
    assert cb_resumed.ema.step == cb_whole.ema.step == 12
    _equal_states(cb_resumed.ema.averaged_tensors(), cb_whole.ema.averaged_tensors())
    _equal_states(_live(resumed), _live(whole))


def test_evaluate_both_logs_each_weight_set_and_other_callbacks_run_once(tmp_path):
    class Count(L.Callback):
        def __init__(self):
            self.seen = []

        def on_validation_end(self, trainer, pl_module):
            self.seen.append(sorted(trainer.callback_metrics))

    count, cb = Count(), EMACallback(0.8, evaluate="both")
    stop = EarlyStopping(monitor="val_loss_ema", patience=100)
    model = Regression()
    fit = trainer(max_epochs=3, callbacks=[count, cb, stop], logger=CSVLogger(tmp_path))
    fit.fit(model, data(4), VAL)
    assert count.seen == [["val_loss", "val_loss_ema"]] * 3  # once per validation, both names
    averaged, live = _val_loss(_average_model(cb)), _val_loss(copy.deepcopy(model).eval())
    assert fit.callback_metrics["val_loss_ema"] == averaged
    assert fit.callback_metrics["val_loss"] == live
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        logged = [float(row["val_loss_ema"]) for row in csv.DictReader(f) if row["val_loss_ema"]]
    assert len(logged) == 3 and logged[-1] == pytest.approx(averaged.item())
    # EarlyStopping saw each averaged loss once: best and patience count as in the log
    assert stop.best_score.item() == pytest.approx(min(logged))
    assert stop.wait_count == 2 - int(np.argmin(logged))
    (validated,) = fit.validate(model, VAL, verbose=False)
    assert validated == {"val_loss": live.item(), "val_loss_ema": averaged.item()}
    (tested,) = fit.test(model, VAL, verbose=False)
    assert tested == {"test_loss": live.item(), "test_loss_ema": averaged.item()}


def test_several_averages_evaluate_the_named_one_and_end_with_another():
    decay = {"slow": 0.99, "fast": 0.5}
    cb = EMACallback(decay, evaluate="both", average="fast", final_weights="slow")
    model = Regression()
    fit = trainer(max_epochs=2, callbacks=[cb])
    fit.fit(model, data(4), VAL)
    assert fit.callback_metrics["val_loss_ema[fast]"] == _val_loss(_average_model(cb, "fast"))
    assert "val_loss_ema" not in fit.callback_metrics
    _equal_states(_live(model), cb.ema.averaged_tensors("slow"))  # final_weights="slow"


def test_steps_the_gradient_scaler_skips_are_not_counted():
    class Overflowing(Regression):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx in (2, 5) else loss

    rec, cb = Record(), EMACallback(0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
    fit = trainer(
        max_epochs=1, callbacks=[rec, cb], plugins=[MixedPrecision("16-mixed", "cpu", scaler)]
    )
    model = Overflowing()
    fit.fit(model, data(8))
    assert fit.global_step == 8 and scaler.get_scale() == 0.25  # Lightning counts both skips
    assert cb.ema.step == len(rec.states) - 1 == 6
    floats = [k for k in rec.states[0] if rec.states[0][k].is_floating_point()]
    for k in floats:
        expected = reference.ema(
            [s[k].double().numpy() for s in rec.states[1:]], [0.9] * 6, rec.states[0][k]
        )
        np.testing.assert_allclose(
            cb.ema.averaged_tensors()[k].double().numpy(), expected, rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("evaluate", ["average", "both"])
def test_an_exception_in_validation_gives_everything_back(evaluate):
    class Failing(Regression):
        def validation_step(self, batch, batch_idx):
            if self.current_epoch == 1:
                raise KeyError("boom")
            return super().validation_step(batch, batch_idx)

    rec, cb, other = Record(), EMACallback(0.8, evaluate=evaluate), L.Callback()
    model = Failing()
    fit = trainer(max_epochs=3, callbacks=[rec, cb, other])
    callbacks = list(fit.callbacks)
    with pytest.raises(KeyError, match="boom"):
        fit.fit(model, data(3), VAL)
    _equal_states(_live(model), rec.states[-1])
    assert fit.callbacks == callbacks and "log" not in vars(model)  # the averaged pass's changes
    assert "run" not in vars(fit.fit_loop.epoch_loop.val_loop)
    cb.ema.update()  # not left swapped in


def test_a_checkpoint_of_other_averages_is_an_error_and_one_without_ema_a_warning(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[EMACallback(0.9), ckpt], enable_checkpointing=True).fit(
        Regression(), data(2)
    )
    other = EMACallback({"slow": 0.99, "fast": 0.5})
    with pytest.raises(ValueError, match=r"\['0.9'\].*\['slow', 'fast'\]"):
        trainer(max_epochs=2, callbacks=[other]).fit(
            Regression(), data(2), ckpt_path=tmp_path / "last.ckpt"
        )
    plain = tmp_path / "plain"
    ckpt = ModelCheckpoint(dirpath=plain, save_last=True)
    trainer(max_epochs=1, callbacks=[ckpt], enable_checkpointing=True).fit(Regression(), data(2))
    cb = EMACallback(0.9)
    with pytest.warns(UserWarning, match="no EMACallback state"):
        trainer(max_epochs=2, callbacks=[cb]).fit(
            Regression(), data(2), ckpt_path=plain / "last.ckpt"
        )
    assert cb.ema.step == 2  # a new average from the resumed weights


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"evaluate": "ema"}, ValueError, r"evaluate must be one of .*'ema'"),
        ({"average": "slow"}, ValueError, r"average='slow' is not one of .*\['0.999'\]"),
        ({"final_weights": "best"}, ValueError, r"final_weights .*'best'"),
        ({"beta": 0.9}, TypeError, r"unknown polyak.EMA argument\(s\) \['beta'\]"),
        ({"save_average_as_weights": 1}, TypeError, "save_average_as_weights must be"),
        ({"decay": 1.5}, ValueError, "1.5"),
    ],
)
def test_bad_arguments_are_named_before_training(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMACallback(**kwargs)


def test_a_bad_ema_argument_value_fails_at_fit_start_before_any_step():
    model = Regression()
    before = _live(model)
    with pytest.raises(ValueError, match="buffers"):
        trainer(max_epochs=1, callbacks=[EMACallback(0.9, buffers="mean")]).fit(model, data(2))
    _equal_states(_live(model), before)


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_cpu_processes(tmp_path):
    """DDP: every rank holds the same average, and rank 0's checkpoint resumes in one process.
    FSDP2 through ModelParallelStrategy: the average of the sharded model (gathered) is the
    DDP one, and a resumed run equals an uninterrupted one."""
    import socket

    import torch.multiprocessing as mp

    from lightning_dist_workers import fits

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fits, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert set(r["ddp_metrics"]) == {"val_loss", "val_loss_ema"}
    _equal_states(ranks[0]["ddp"], ranks[1]["ddp"])
    assert ranks[0]["ddp_step"] == 4  # 2 epochs of 4 batches split over 2 ranks

    saved, resumed = ranks[0]["fsdp"]["averages"]["0.8"], ranks[0]["fsdp_resumed"]["averages"]
    for k in ("net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.3.weight"):
        # parameters (sharded, gathered): the DDP average, and resumed == uninterrupted. FSDP2
        # leaves BatchNorm statistics unsynchronised, one set per rank, and a checkpoint keeps
        # one of them (Lightning's distributed checkpoint too), so those differ after a resume.
        torch.testing.assert_close(saved[k], ranks[0]["ddp"][k], rtol=1e-5, atol=1e-6)
        assert torch.equal(resumed["0.8"][k], saved[k]), k
    assert set(ranks[0]["fsdp_metrics"]) == {"val_loss", "val_loss_ema"}

    class Loaded(L.Callback):  # runs after EMACallback built the EMA from the checkpoint
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in cb.ema.averaged_tensors().items()}

    cb, loaded = EMACallback(0.8, evaluate="both"), Loaded()
    fit = trainer(max_epochs=3, callbacks=[cb, loaded])
    fit.fit(Regression(), data(4), VAL, ckpt_path=tmp_path / "ddp" / "last.ckpt")
    _equal_states(loaded.state, ranks[0]["ddp"])
    assert cb.ema.step == 4 + 4  # one more epoch of 4 batches in one process


def test_a_failed_average_as_weights_leaves_the_checkpoint_unchanged(monkeypatch):
    cb, model = EMACallback(0.8, save_average_as_weights=True), Regression()
    fit = trainer(max_epochs=1, callbacks=[cb])
    fit.fit(model, data(2))
    checkpoint = {"state_dict": _live(model), "callbacks": {cb.state_key: cb.state_dict()}}
    before = copy.deepcopy(checkpoint)

    def fail():
        raise RuntimeError("out of memory")

    monkeypatch.setattr(polyak.export, "averaged_state_dict", lambda *a, **k: fail())
    with pytest.raises(RuntimeError, match="out of memory"):
        cb.on_save_checkpoint(fit, model, checkpoint)
    _equal_states(checkpoint["state_dict"], before["state_dict"])
    assert checkpoint["callbacks"][cb.state_key].keys() == before["callbacks"][cb.state_key].keys()
    _equal_states(_live(model), before["state_dict"])  # the average was swapped back out


@pytest.mark.slow
def test_an_entry_grafted_from_another_checkpoint_is_refused(tmp_path):
    """The callback's entry of the step-6 checkpoint put into the step-3 one (same run): fit,
    validate and test from it are refused (an earlier version resumed step 6's average)."""
    every = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    cb = EMACallback(0.9)
    trainer(max_epochs=2, callbacks=[cb, every], enable_checkpointing=True).fit(
        Regression(), data(3)
    )
    early = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    late = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    assert (early["global_step"], late["global_step"]) == (3, 6)
    early["callbacks"][cb.state_key] = late["callbacks"][cb.state_key]
    grafted = tmp_path / "grafted.ckpt"
    torch.save(early, grafted)
    match = (
        r"grafted.ckpt: callbacks\[.*\]: the EMA state was taken at global step 6, but the "
        r"checkpoint is at global step 3"
    )
    resumed = EMACallback(0.9)
    with pytest.raises(CheckpointError, match=match):
        trainer(max_epochs=3, callbacks=[resumed]).fit(Regression(), data(3), ckpt_path=grafted)
    assert resumed.ema is None or resumed.ema.step == 0
    with pytest.raises(CheckpointError, match=match):
        trainer(callbacks=[EMACallback(0.9)]).test(Regression(), VAL, ckpt_path=grafted)


def test_the_checkpoint_entry_is_checked_against_its_schema():
    ema = polyak.EMA(Regression(), 0.9)
    good = make_entry(ema.state_dict(), 3)
    assert check_entry(good, "x.ckpt", 3) is good
    assert check_entry({**good, "live_state_dict": {"w": torch.ones(1)}}, "x.ckpt", None)
    for bad, match in [
        ([], "expected a dict, got list"),
        ({"ema": good["ema"]}, "not a 'polyak EMACallback' entry of version 1"),
        ({**good, "version": 2}, "of version 1"),
        ({**good, "extra": 1}, r"\['extra'\] unknown"),
        ({k: v for k, v in good.items() if k != "global_step"}, r"\['global_step'\] are missing"),
        ({**good, "global_step": -1}, "'global_step' must be an int >= 0, got -1"),
        ({**good, "global_step": True}, "'global_step' must be an int >= 0, got True"),
        (
            {**good, "global_step": 4},
            "taken at global step 4, but the checkpoint is at global step 3",
        ),
        ({**good, "ema": [1]}, "'ema' must be a dict"),
        ({**good, "live_state_dict": {"w": 1.0}}, "'live_state_dict' must map tensor names"),
    ]:
        with pytest.raises(CheckpointError, match=rf"^x.ckpt: .*{match}"):
            check_entry(bad, "x.ckpt", 3)


@pytest.mark.slow
def test_a_state_that_does_not_load_is_a_checkpoint_error_and_changes_nothing():
    cb = EMACallback(0.9)
    model = Regression()
    fit = trainer(max_epochs=1, callbacks=[cb])
    fit.fit(model, data(2))
    before = {k: v.clone() for k, v in cb.ema.averaged_tensors().items()}
    entry = cb.state_dict()
    entry["ema"] = {**entry["ema"], "copied": {}}  # a tensor missing
    with pytest.raises(CheckpointError, match=r"\['ema'\]: the saved EMA state does not load"):
        cb.load_state_dict(entry)
    _equal_states(cb.ema.averaged_tensors(), before)


def test_average_as_weights_keeps_two_model_copies_and_is_marked(tmp_path):
    from polyak.integrations._checkpoint_entry import MARKER

    cb = EMACallback(0.8, save_average_as_weights=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = Regression()
    trainer(max_epochs=1, callbacks=[cb, ckpt], enable_checkpointing=True).fit(model, data(3))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    entry = saved["callbacks"][cb.state_key]
    params = set(model.state_dict())
    copies = [  # model-size copies: tensors named like the model's, wherever they are kept
        table
        for table in (
            saved["state_dict"],
            entry["live_state_dict"],
            *entry["ema"]["averages"].values(),
        )
        if params & set(table)
    ]
    assert len(copies) == 2 and entry["ema"]["averages"]["0.8"] == {}  # Lightning's count
    averaged = [n for n, t in cb.ema.layout().items() if t.kind == "average"]
    assert entry["in_state_dict"]["names"] == averaged
    marker = {"holds": "average", "average": "0.8", "callback": cb.state_key}
    assert saved[MARKER] == marker and marker in saved["callbacks"].values()
    # resumed without the callback: Lightning's warning names the marker
    with pytest.warns(UserWarning, match="state_dict of this checkpoint holds an EMA average"):
        trainer(max_epochs=2).fit(Regression(), data(3), ckpt_path=tmp_path / "last.ckpt")
    # resumed with it: the average comes back from the state_dict, bit for bit, no warning
    again = EMACallback(0.8, save_average_as_weights=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1, callbacks=[again]).fit(
            Regression(), data(3), ckpt_path=tmp_path / "last.ckpt"
        )
    assert not [w for w in caught if "holds an EMA average" in str(w.message)]
    loaded = again.state_dict()["ema"]["averages"]["0.8"]  # the state waiting for the next fit
    _equal_states(
        {k: loaded[k] for k in averaged}, {k: cb.ema.averaged_tensors()[k] for k in averaged}
    )
    with pytest.raises(CheckpointError, match="resume through Trainer.fit"):
        EMACallback(0.8).load_state_dict(copy.deepcopy(entry))


def test_should_update_at_epoch_ends_and_start_epoch_follow_the_reference():
    class EpochEnds(EMACallback):
        def should_update(self, step_idx=None, epoch_idx=None):
            return epoch_idx is not None

    rec, cb = Record(), EpochEnds(0.5)
    trainer(max_epochs=3, callbacks=[rec, cb]).fit(Regression(), data(2))
    assert cb.ema.step == 6 and cb.ema.timeline.num_updates == 3  # one update per epoch
    states = [rec.states[i] for i in (2, 4, 6)]  # each covering 2 steps: decay 0.5**2
    for k, v in cb.ema.averaged_tensors().items():
        if v.is_floating_point():
            exp = reference.ema(
                [s[k].double().numpy() for s in states], [0.25] * 3, rec.states[0][k]
            )
            np.testing.assert_allclose(v.double().numpy(), exp, rtol=1e-6, atol=1e-7)

    rec, late = Record(), EMACallback(0.5, start_epoch=2)
    model = Regression()
    trainer(max_epochs=3, callbacks=[rec, late]).fit(model, data(2), VAL)
    assert late.ema.step == 2  # built at the start of epoch 2 (after 4 steps) from the weights
    for k, v in late.ema.averaged_tensors().items():
        if v.is_floating_point():
            exp = reference.ema(
                [s[k].double().numpy() for s in rec.states[5:]], [0.5] * 2, rec.states[4][k]
            )
            np.testing.assert_allclose(v.double().numpy(), exp, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="start_epoch must be"):
        EMACallback(0.5, start_epoch=-1)
