"""polyak.integrations.transformers.EMACallback with the real transformers Trainer on CPU, and
polyak.EMA in Accelerate's checkpoints. Tiny GPT-2 built from a config, random tokens."""

from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import shutil
import uuid

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

import polyak
import reference
from polyak.errors import CheckpointError
from polyak.integrations._ema_files import JSON_NAME, read_ema_files, save_ema_files
from polyak.integrations._identity import RECORD, read_own_files, recorded_run
from polyak.integrations.transformers import EMACallback

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
logging.getLogger("accelerate").setLevel(logging.ERROR)


class Tokens(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


TRAIN, EVAL = Tokens(48, 0), Tokens(16, 1)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    config.eos_token_id = config.bos_token_id = 0
    return GPT2LMHeadModel(config)


def hf_trainer(tmp_path, callbacks=(), model=None, **kwargs):
    options = {
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "max_steps": 6,
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "seed": 0,
    }
    options.update(kwargs)
    args = TrainingArguments(str(tmp_path), **options)
    return Trainer(
        model=model or gpt2(),
        args=args,
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=list(callbacks),
    )


def _live(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Record(TrainerCallback):
    """The live weights after each optimizer step (and before the first)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.states = [_live(model)]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.states.append(_live(model))


def _average_model(cb, name=None):
    model = gpt2()
    model.load_state_dict(cb.ema.averaged_tensors(name), strict=False)  # lm_head is tied
    return model


@pytest.mark.slow
def test_one_update_per_optimizer_step_several_averages_and_final_weights(tmp_path):
    decay = {"slow": 0.9, "fast": polyak.schedules.warmup(0.5)}
    rec, cb = Record(), EMACallback(decay, average="fast", final_weights="slow")
    trainer = hf_trainer(tmp_path, [rec, cb], max_steps=5)
    trainer.train()
    assert trainer.state.global_step == cb.ema.step == cb.ema.num_updates == 5
    assert len(rec.states) == 6  # 2 micro-batches per step: one update per optimizer step

    replay = gpt2()  # a manual polyak.EMA updated after each optimizer step
    replay.load_state_dict(rec.states[0])
    manual = polyak.EMA(replay, decay)
    for state in rec.states[1:]:
        replay.load_state_dict(state)
        manual.update()
    for name, per_step in (("slow", lambda t: 0.9), ("fast", decay["fast"].per_step)):
        got, want = cb.ema.averaged_tensors(name), manual.averaged_tensors(name)
        decays = [per_step(t) for t in range(1, 6)]
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
            expected = reference.ema(
                [s[k].double().numpy() for s in rec.states[1:]], decays, rec.states[0][k]
            )
            np.testing.assert_allclose(got[k].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # final_weights="slow": the model ends with that average
    for k, v in cb.ema.averaged_tensors("slow").items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
    metrics = trainer.evaluate()  # evaluate="average" on the average named "fast"
    plain = hf_trainer(tmp_path, model=_average_model(cb, "fast")).evaluate()
    assert metrics["eval_loss"] == plain["eval_loss"]


@pytest.mark.slow
def test_evaluation_runs_on_the_average_and_training_never_sees_it(tmp_path):
    periodic = {"eval_strategy": "steps", "eval_steps": 2, "eval_on_start": True}
    without = hf_trainer(tmp_path / "a", **periodic)
    without.train()
    cb = EMACallback(0.8, evaluate="both")
    trainer = hf_trainer(tmp_path / "b", [cb], **periodic)
    trainer.train()
    _equal_states(_live(trainer.model), _live(without.model))  # bit for bit

    history = trainer.state.log_history  # one row per evaluation, every weight set in it
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 2, 4, 6]
    averaged = [e for e in history if "eval_ema_loss" in e]
    assert [e["step"] for e in averaged] == [2, 4, 6]  # none before the first update
    assert all("eval_loss" in e for e in averaged)

    metrics = trainer.evaluate()
    by_hand = hf_trainer(tmp_path / "c", model=_average_model(cb)).evaluate()
    live = hf_trainer(tmp_path / "d", model=without.model).evaluate()
    assert metrics["eval_ema_loss"] == by_hand["eval_loss"] == averaged[-1]["eval_ema_loss"]
    assert metrics["eval_loss"] == live["eval_loss"] != metrics["eval_ema_loss"]
    named = trainer.evaluate({"x": EVAL})  # several eval sets: each prefix gets "_ema"
    assert named["eval_x_ema_loss"] == metrics["eval_ema_loss"]
    assert named["eval_x_loss"] == metrics["eval_loss"]
    predicted = trainer.predict(EVAL).predictions  # predict: the average
    expected = hf_trainer(tmp_path / "e", model=_average_model(cb)).predict(EVAL).predictions
    np.testing.assert_array_equal(predicted, expected)
    _equal_states(_live(trainer.model), _live(without.model))


def _move_ema_files(source, target):
    """Replace ``target``'s EMA files with copies of ``source``'s (what a user copying a
    checkpoint's files around does)."""
    for f in target.glob("polyak_ema*"):
        f.unlink()
    for f in source.glob("polyak_ema*"):
        shutil.copy(f, target)


def test_checkpoints_hold_the_ema_a_resumed_run_matches_and_files_of_another_step_are_refused(
    tmp_path,
):
    """The one fast Trainer run: save, resume bit for bit, and the files of checkpoint-6 copied
    into checkpoint-3 refused (they loaded on an earlier version: step 9 where the Trainer was
    at 6)."""
    saving = {"save_strategy": "steps", "save_steps": 3}
    whole = EMACallback(polyak.schedules.warmup(0.9))
    first = hf_trainer(tmp_path, [whole], **saving)
    first.train()
    meta = json.loads((tmp_path / "checkpoint-3" / JSON_NAME).read_text())
    assert (tmp_path / "checkpoint-3" / meta["tensors"]).is_file()
    assert meta["state"]["timeline"]["step"] == 3
    saved = read_ema_files(tmp_path / "checkpoint-6")
    _equal_states(saved.state["averages"]["warmup(0.9)"], whole.ema.averaged_tensors())
    assert saved.run == meta["run"] and (saved.global_step, meta["global_step"]) == (6, 3)

    resumed = EMACallback(polyak.schedules.warmup(0.9))
    again = hf_trainer(tmp_path, [resumed], **saving)
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.ema.step == 6
    diffs = [
        (v - resumed.ema.averaged_tensors()[k]).abs().max().item()
        for k, v in whole.ema.averaged_tensors().items()
    ]
    assert max(diffs) == 0.0  # CPU, deterministic: bit for bit
    _equal_states(_live(again.model), _live(first.model))
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["EMACallback"]["attributes"][RECORD] == meta["run"]

    _move_ema_files(tmp_path / "checkpoint-6", tmp_path / "checkpoint-3")
    late = EMACallback(polyak.schedules.warmup(0.9))
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-3/polyak_ema.json: the EMA state was saved at global step 6, but the "
        r"Trainer resumes at global step 3: .* resume from checkpoint-6",
    ):
        hf_trainer(tmp_path, [late], **saving).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-3")
        )
    assert late.ema.step == 0  # nothing loaded


@pytest.mark.slow
def test_ema_files_of_another_run_are_refused(tmp_path):
    saving = {"save_strategy": "steps", "save_steps": 3, "max_steps": 3}
    runs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        hf_trainer(out, [EMACallback(0.9)], **saving).train()
        runs.append(read_ema_files(out / "checkpoint-3").run)
    assert runs[0] != runs[1]
    _move_ema_files(tmp_path / "b" / "checkpoint-3", tmp_path / "a" / "checkpoint-3")
    with pytest.raises(
        CheckpointError,
        match=rf"saved by run {runs[1]}, but this checkpoint belongs to run {runs[0]} "
        r"\(trainer_state.json\): the EMA files were copied in from another run",
    ):
        hf_trainer(tmp_path / "a", [EMACallback(0.9)], **saving).train(resume_from_checkpoint=True)


@pytest.mark.slow
def test_restore_callback_states_from_checkpoint_keeps_the_callback_given(tmp_path):
    """With restore_callback_states_from_checkpoint=True the Trainer replaces each stateful
    callback by one built from trainer_state.json; the stand-in gives the place back."""
    saving = {
        "save_strategy": "steps",
        "save_steps": 3,
        "restore_callback_states_from_checkpoint": True,
    }
    whole = EMACallback({"slow": 0.9, "fast": 0.5})
    hf_trainer(tmp_path, [whole], **saving).train()
    cb = EMACallback({"slow": 0.9, "fast": 0.5})
    trainer = hf_trainer(tmp_path, [cb], **saving)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert [c for c in trainer.callback_handler.callbacks if isinstance(c, EMACallback)] == [cb]
    assert trainer.callback_handler.callbacks[-1] is cb  # where the Trainer put its stand-in
    assert cb.ema.step == 6
    for name in whole.ema.names:
        _equal_states(cb.ema.averaged_tensors(name), whole.ema.averaged_tensors(name))
    late = hf_trainer(tmp_path, **saving)  # added after the Trainer was built: nothing to hand to
    late.add_callback(EMACallback({"slow": 0.9, "fast": 0.5}))
    with pytest.raises(ValueError, match="rather than add_callback"):
        late.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_one_ema_callback_per_trainer(tmp_path):
    with pytest.raises(ValueError, match="one EMACallback per Trainer"):
        hf_trainer(tmp_path, [EMACallback(0.9), EMACallback(0.5)])


def test_the_run_kept_in_trainer_state_is_checked_before_use(tmp_path):
    cb = EMACallback(0.9)
    state = TrainerState(stateful_callbacks=[cb])  # what the Trainer saves in trainer_state.json
    where = "checkpoint-3/trainer_state.json"
    assert (
        recorded_run(state.stateful_callbacks, "EMACallback", where)
        == cb.state()["attributes"][RECORD]
    )
    for bad, match in [
        ({}, "records no EMACallback under 'stateful_callbacks'"),
        ({"EMACallback": {"args": {}}}, "attributes.polyak_run' must be the run identity"),
        ({"EMACallback": [cb.state(), cb.state()]}, "must be the run identity"),
        ({"EMACallback": {"attributes": {RECORD: "../x"}}}, "must be the run identity"),
        ([], "records no EMACallback"),
    ]:
        with pytest.raises(CheckpointError, match=rf"^{where}.*{match}"):
            recorded_run(bad, "EMACallback", where)

    ema = polyak.EMA(gpt2(), 0.9)
    run = uuid.uuid4().hex
    save_ema_files(tmp_path, ema.state_dict(), run=run, global_step=3)
    assert read_own_files(tmp_path, run, 3, at="x").run == run
    with pytest.raises(CheckpointError, match="saved by run .* copied in from another run"):
        read_own_files(tmp_path, uuid.uuid4().hex, 3, at="x")
    with pytest.raises(CheckpointError, match="saved at global step 3, but x global step 4"):
        read_own_files(tmp_path, run, 4, at="x")


@pytest.mark.slow
def test_the_best_checkpoint_by_the_averaged_loss_brings_its_average_back(tmp_path):
    cb = EMACallback(0.5, evaluate="both")
    trainer = hf_trainer(
        tmp_path,
        [cb],
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="ema_loss",  # eval_ema_loss: the averaged pass's
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    losses = {
        e["step"]: e["eval_ema_loss"] for e in trainer.state.log_history if "eval_ema_loss" in e
    }
    assert best.endswith(f"checkpoint-{min(losses, key=losses.get)}")
    assert int(best.rsplit("-", 1)[1]) < 6  # not the last: the final average was replaced
    saved = read_ema_files(best)
    _equal_states(cb.ema.averaged_tensors(), saved.state["averages"]["0.5"])
    assert cb.ema.step == int(best.rsplit("-", 1)[1])


@pytest.mark.slow
def test_resuming_without_or_with_damaged_ema_files_is_a_named_error(tmp_path):
    first = hf_trainer(tmp_path, [EMACallback(0.9)], save_strategy="steps", save_steps=3)
    first.train()
    step3 = tmp_path / "checkpoint-3"
    (tensors,) = step3.glob("polyak_ema.*.safetensors")
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{tensors.name} does not match the field 'sha256'"):
        hf_trainer(tmp_path, [EMACallback(0.9)]).train(resume_from_checkpoint=str(step3))
    (tmp_path / "checkpoint-6" / JSON_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint-6/{JSON_NAME} is missing"):
        hf_trainer(tmp_path, [EMACallback(0.9)]).train(resume_from_checkpoint=True)


def test_a_save_that_fails_midway_leaves_the_previous_files_loadable(tmp_path, monkeypatch):
    model = gpt2()
    ema = polyak.EMA(model, {"a": 0.9, "b": 0.5})
    run1 = uuid.uuid4().hex
    save_ema_files(tmp_path, ema.state_dict(), run=run1, global_step=0)
    first = {n: {k: v.clone() for k, v in ema.averaged_tensors(n).items()} for n in ema.names}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    replace = os.replace

    def fail_on_the_json(src, dst):
        if str(dst).endswith(JSON_NAME):
            raise OSError("disk full")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_json)
    with pytest.raises(OSError, match="disk full"):
        save_ema_files(tmp_path, ema.state_dict(), run=uuid.uuid4().hex, global_step=1)
    monkeypatch.undo()
    state, run, _, _ = read_ema_files(tmp_path)  # the first save, intact
    assert run == run1 and state["timeline"]["step"] == 0
    for name, table in state["averages"].items():
        for k, v in table.items():
            assert torch.equal(v, first[name][k]), (name, k)
    assert not list(tmp_path.glob(".polyak_ema*"))  # no temporary file left
    save_ema_files(tmp_path, ema.state_dict(), run=run1, global_step=1)  # the next cleans up
    assert len(list(tmp_path.glob("polyak_ema.*.safetensors"))) == 1
    assert read_ema_files(tmp_path).state["timeline"]["step"] == 1


@pytest.mark.slow
def test_save_pretrained_writes_the_average_that_from_pretrained_loads(tmp_path):
    cb = EMACallback(0.8)
    trainer = hf_trainer(tmp_path, max_steps=3)
    trainer.add_callback(cb)  # after the Trainer's __init__: found when training begins
    with pytest.raises(RuntimeError, match="no average yet"):
        cb.save_pretrained(tmp_path / "too-early")
    trainer.train()
    assert cb.ema.step == 3
    live = _live(trainer.model)
    cb.save_pretrained(tmp_path / "average", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "average").glob("*.safetensors"))
    assert len(shards) > 1  # sharded as the model's own save_pretrained shards
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "average")
    for k, v in cb.ema.averaged_tensors().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    _equal_states(_live(trainer.model), live)


def test_accelerate_save_state_and_load_state_carry_the_ema(tmp_path):
    from accelerate import Accelerator

    loader = DataLoader(TRAIN, batch_size=8)

    def setup():
        accelerator = Accelerator(cpu=True)
        model = gpt2()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer, batches = accelerator.prepare(model, optimizer, loader)
        ema = polyak.EMA(accelerator.unwrap_model(model), {"a": 0.9, "b": 0.5})
        accelerator.register_for_checkpointing(ema)
        return accelerator, model, optimizer, ema, list(batches)

    def steps(accelerator, model, optimizer, ema, batches):
        for batch in batches:
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
            ema.update()

    accelerator, model, optimizer, ema, batches = setup()
    steps(accelerator, model, optimizer, ema, batches[:3])
    accelerator.save_state(tmp_path / "state")
    saved = {n: {k: v.clone() for k, v in ema.averaged_tensors(n).items()} for n in ema.names}
    steps(accelerator, model, optimizer, ema, batches[3:])

    # Accelerate unpickles custom_checkpoint_0.pkl (torch.load(weights_only=False)): an object
    # that a weights_only load refuses reaches EMA.load_state_dict, which names it
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "state", bad)
    state = torch.load(bad / "custom_checkpoint_0.pkl", weights_only=True)
    state["timeline"]["step"] = datetime.date(2026, 1, 1)
    torch.save(state, bad / "custom_checkpoint_0.pkl")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(bad / "custom_checkpoint_0.pkl", weights_only=True)
    accelerator2, model2, optimizer2, ema2, _ = setup()
    fresh = {k: v.clone() for k, v in ema2.averaged_tensors("a").items()}
    with pytest.raises(TypeError, match=r"step must be an int, got datetime.date\(2026, 1, 1\)"):
        accelerator2.load_state(bad)
    assert ema2.step == 0
    _equal_states(ema2.averaged_tensors("a"), fresh)  # all or nothing

    accelerator2.load_state(tmp_path / "state")
    assert ema2.step == 3
    for n in ema.names:
        _equal_states(ema2.averaged_tensors(n), saved[n])
    steps(accelerator2, model2, optimizer2, ema2, batches[3:])
    for n in ema.names:
        _equal_states(ema2.averaged_tensors(n), ema.averaged_tensors(n))


@pytest.mark.slow
def test_every_named_average_is_evaluated_in_one_row_with_the_live_weights(tmp_path):
    cb = EMACallback({"slow": 0.9, "fast": 0.5}, evaluate="both")
    periodic = {"eval_strategy": "steps", "eval_steps": 3}
    trainer = hf_trainer(tmp_path, [cb], **periodic)
    trainer.train()
    rows = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in rows] == [3, 6]
    for row in rows:
        assert {"eval_ema_slow_loss", "eval_ema_fast_loss"} <= set(row)
    metrics = trainer.evaluate()
    for name in ("slow", "fast"):
        by_hand = hf_trainer(tmp_path / name, model=_average_model(cb, name)).evaluate()
        assert (
            metrics[f"eval_ema_{name}_loss"]
            == by_hand["eval_loss"]
            == rows[-1][f"eval_ema_{name}_loss"]
        )
    assert trainer.state.log_history[-1] == {
        **metrics,
        **{k: trainer.state.log_history[-1][k] for k in ("epoch", "step")},
    }
