"""Scheduled write-back (polyak.workflows.WriteBack, EMA.copy_to(restart=True)): the schedule,
restarts against a float64 reference, resume, all-or-nothing, and the live weights before and
after a write-back in train_with_ema and the real Lightning and Hugging Face Trainers."""

from __future__ import annotations

import copy

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import TrainerCallback

import polyak
import reference
from lightning_helpers import Regression, data, trainer
from polyak import schedules
from polyak.averages import bema
from polyak.integrations.lightning import EMACallback as LightningEMA
from polyak.integrations.transformers import EMACallback as HFEMA
from polyak.workflows import WriteBack
from test_integrations_transformers import hf_trainer


def test_the_schedule_and_its_bad_arguments():
    assert [c for c in range(1, 12) if WriteBack(every=3).due(c)] == [3, 6, 9]
    assert [c for c in range(1, 12) if WriteBack(2, start=3, end=8).due(c)] == [5, 7]
    for bad in ({"every": 0}, {"start": -1}, {"end": -2}, {"unit": "batches"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            WriteBack(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not one of the averages"):
        WriteBack(average="slow").check(polyak.EMA(torch.nn.Linear(2, 2), {"fast": 0.9}))


def _walk(steps, seed=0):
    rng = np.random.default_rng(seed)
    return list(np.cumsum(rng.normal(size=(steps + 1, 2, 3)), axis=0))


def _set(model, value):
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(value))


@pytest.mark.parametrize("every", [1, 2])
def test_a_restart_starts_every_average_again_from_the_written_weights(every):
    values = _walk(16)
    model = torch.nn.Linear(3, 2, bias=False).double()
    _set(model, values[0])
    decays = {"mean": schedules.uniform(), "c": 0.8, "b": bema(0.5, 0.3)}
    ema = polyak.EMA(model, decays, update_every=every)
    for t in range(1, 7):
        _set(model, values[t])
        ema.update()
    written = ema.averaged_state_dict("b")["weight"].clone()
    before = model.weight.detach().clone()
    ema.copy_to(model, "b", restart=True)
    assert torch.equal(model.weight, written) and not torch.equal(model.weight, before)
    assert ema.timeline.step == 6 and ema._timeline.origin == 6
    saved = copy.deepcopy(ema.state_dict())
    for t in range(7, 17):
        _set(model, values[t])
        ema.update()
    w0 = written.numpy()
    later = values[7:]
    got = {n: ema.averaged_tensors(n)["weight"].numpy() for n in ("mean", "c")}
    np.testing.assert_allclose(
        got["mean"], reference.timeline_average(later, lambda t: (t - 1) / t, w0, every)
    )
    np.testing.assert_allclose(
        got["c"], reference.timeline_average(later, lambda t: 0.8, w0, every), rtol=1e-12
    )
    # BEMA: anchor and EMA part start at the written weights, t counts from the restart
    want = reference.bema([w0, *later], bema(0.5, 0.3), every)[10]
    np.testing.assert_allclose(ema.averaged_state_dict("b")["weight"].numpy(), want, rtol=1e-9)
    # the restart survives a save and load
    again = polyak.EMA(copy.deepcopy(model), copy.deepcopy(decays), update_every=every)
    again.load_state_dict(saved)
    _set(again.model, written.numpy())
    for t in range(7, 17):
        _set(again.model, values[t])
        again.update()
    for n in decays:
        assert torch.equal(
            again.averaged_state_dict(n)["weight"], ema.averaged_state_dict(n)["weight"]
        )


def test_a_failure_while_staging_leaves_model_averages_and_timeline_as_they_were(monkeypatch):
    model = torch.nn.Linear(3, 2)
    ema = polyak.EMA(model, {"plain": 0.5, "b": bema()})
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    live = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(ema.state_dict())

    def broken(*args):
        raise MemoryError("injected")

    monkeypatch.setattr("polyak._torch.ema.corrected", broken)
    with pytest.raises(MemoryError):
        ema.copy_to(model, "b", restart=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    after = ema.state_dict()
    assert after["timeline"] == state["timeline"]
    for n in ("plain", "b"):
        assert torch.equal(after["averages"][n]["weight"], state["averages"][n]["weight"])


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g)
    return DataLoader(TensorDataset(x, x @ torch.ones(3, 1)), batch_size=8)


@pytest.mark.parametrize(
    "wb", [WriteBack(every=3, unit="steps"), WriteBack(unit="epochs", restart=True)]
)
def test_train_with_ema_writes_back_as_a_hand_written_loop_does(wb):
    def run(auto: bool) -> tuple[torch.nn.Module, polyak.EMA]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ema = polyak.EMA(model, {"a": 0.7, "u": schedules.uniform()})
        if auto:
            polyak.train_with_ema(
                model, _loader(), _loader(), opt, torch.nn.functional.mse_loss, 3, ema=ema,
                write_back=wb, final_weights="live", progress=False,
            )  # fmt: skip
            return model, ema
        for _ in range(3):
            for x, y in _loader():
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.update()
                if wb.unit == "steps" and wb.due(ema.step):
                    ema.copy_to(model, "a", restart=wb.restart)
            if wb.unit == "epochs":
                ema.copy_to(model, "a", restart=wb.restart)
        return model, ema

    (auto, ema_auto), (hand, ema_hand) = run(True), run(False)
    for k, v in auto.state_dict().items():
        assert torch.equal(v, hand.state_dict()[k]), k
    for n in ("a", "u"):
        assert torch.equal(
            ema_auto.averaged_tensors(n)["weight"], ema_hand.averaged_tensors(n)["weight"]
        )
    # without write-back the run differs
    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    polyak.train_with_ema(
        plain, _loader(), _loader(), opt, torch.nn.functional.mse_loss, 3, ema_decay=0.7,
        final_weights="live", progress=False,
    )  # fmt: skip
    assert not torch.equal(plain.weight, auto.weight)


class _Seen(L.Callback):
    """After EMACallback: the live weights and the average at every optimizer step."""

    def __init__(self, cb):
        self.cb, self.rows = cb, []

    def on_train_batch_end(self, trainer, module, *args):
        ema = self.cb.ema
        self.rows.append((ema.step, module.net[0].weight.detach().clone(),
                          ema.averaged_tensors()["net.0.weight"].clone()))  # fmt: skip


@pytest.mark.slow
def test_lightning_writes_the_average_into_the_module_at_its_steps():
    cb = LightningEMA(0.8, write_back=WriteBack(every=2, unit="steps"))
    seen = _Seen(cb)
    trainer(max_epochs=1, callbacks=[cb, seen]).fit(Regression(), data(5))
    steps = [s for s, live, avg in seen.rows if torch.equal(live, avg)]
    assert steps == [2, 4]


class _EveryThird(LightningEMA):
    def should_update(self, step_idx=None, epoch_idx=None):
        return step_idx is not None and step_idx % 3 == 2  # after global steps 3, 6, ...


class _GlobalSeen(L.Callback):
    def __init__(self, cb):
        self.cb, self.rows = cb, []

    def on_train_batch_end(self, trainer, module, *args):
        avg = self.cb.ema.averaged_tensors()["net.0.weight"]
        self.rows.append((trainer.global_step, torch.equal(module.net[0].weight, avg)))


@pytest.mark.slow
def test_lightning_writes_back_at_optimizer_steps_when_updates_are_sparser():
    """should_update() updating every third step: the write-back still follows the optimizer
    steps (2 and 4), writing the average as of its last update."""
    cb = _EveryThird(0.8, write_back=WriteBack(every=2, unit="steps"))
    seen = _GlobalSeen(cb)
    trainer(max_epochs=1, callbacks=[cb, seen]).fit(Regression(), data(5))
    assert [s for s, equal in seen.rows if equal] == [2, 4]
    assert cb.ema.timeline.num_updates == 1


class _HFSeen(TrainerCallback):
    def __init__(self, cb):
        self.cb, self.rows = cb, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        w = model.transformer.wte.weight.detach().clone()
        self.rows.append(
            (self.cb.ema.step, w, self.cb.ema.averaged_tensors()["transformer.wte.weight"].clone())
        )


@pytest.mark.slow
def test_hugging_face_writes_the_average_into_the_model_at_its_steps(tmp_path):
    cb = HFEMA(0.8, write_back=WriteBack(every=2, unit="steps", restart=True))
    seen = _HFSeen(cb)
    hf_trainer(tmp_path, callbacks=[cb, seen], max_steps=5).train()
    steps = [s for s, live, avg in seen.rows if torch.equal(live, avg)]
    assert steps == [2, 4]
    assert cb.ema._timeline.origin == 4
