"""polyak.integrations.trl.ReferenceCallback: TR-DPO's reference as a polyak average, against
TRL's own SyncRefModelCallback (real DPOTrainer, tiny Llama, CPU), resumed, and with PEFT."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import reference
from finetune_helpers import dpo_llama, lora, preference_data, word_tokenizer

trl = pytest.importorskip("trl")
from polyak.integrations.trl import ReferenceCallback  # noqa: E402


def dpo(tmp_path, model, ref_model, callbacks=(), **kwargs):
    options = dict(
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    options.update(kwargs)
    args = trl.DPOConfig(str(tmp_path), **options)
    return trl.DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=preference_data(),
        processing_class=word_tokenizer(),
        callbacks=list(callbacks),
    )


def losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.slow
def test_tr_dpo_equals_trls_sync_ref_model_callback_step_for_step(tmp_path):
    model = dpo_llama()
    theirs = dpo(
        tmp_path / "trl",
        model,
        copy.deepcopy(model),
        sync_ref_model=True,
        ref_model_mixup_alpha=0.6,
        ref_model_sync_steps=2,
    )
    ours_model = dpo_llama()
    cb = ReferenceCallback(mixup_alpha=0.6, sync_steps=2)
    ours = dpo(tmp_path / "polyak", ours_model, copy.deepcopy(ours_model), [cb])
    theirs.train()
    ours.train()
    np.testing.assert_allclose(losses(ours), losses(theirs), rtol=1e-5)
    ref_theirs = theirs.ref_model.state_dict()
    ref_ours = ours.ref_model.state_dict()
    for k, v in ref_theirs.items():
        assert torch.allclose(ref_ours[k], v, rtol=1e-5, atol=1e-6), k
    assert cb.ema.step == 6 and cb.ema.timeline.num_updates == 3


@pytest.mark.slow
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    def run(out, **kwargs):
        model = dpo_llama()
        cb = ReferenceCallback(mixup_alpha=0.5, sync_steps=2)
        trainer = dpo(out, model, copy.deepcopy(model), [cb], save_strategy="steps", save_steps=3)
        trainer.train(**kwargs)
        return trainer, cb

    whole, _ = run(tmp_path / "whole")
    resumed, cb = run(
        tmp_path / "whole", resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3")
    )
    assert losses(resumed)[-3:] == losses(whole)[-3:]
    for k, v in whole.ref_model.state_dict().items():
        assert torch.equal(resumed.ref_model.state_dict()[k], v), k
    assert cb.ema.step == 6


@pytest.mark.slow
def test_peft_reference_is_the_averaged_adapter_that_trl_evaluates(tmp_path):
    snapshots = []

    class Snapshot(trl.trainer.callbacks.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append(
                {
                    n: p.detach().double().clone()
                    for n, p in model.named_parameters()
                    if p.requires_grad
                }
            )

    policy = lora(dpo_llama())  # B initialised non-zero: the adapter changes the outputs
    init = {n: p.detach().double().clone() for n, p in policy.named_parameters() if p.requires_grad}
    cb = ReferenceCallback(mixup_alpha=0.6, sync_steps=2)
    trainer = dpo(tmp_path, policy, None, [Snapshot(), cb])
    trainer.train()
    first = next(e for e in trainer.state.log_history if "loss" in e)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0  # ref == policy at start
    assert "ref" in policy.peft_config
    assert all(
        ".default." in n for n, t in cb.ema.layout().items() if t.kind == "average" and "lora" in n
    )
    params = dict(policy.named_parameters())
    for name, x0 in init.items():
        exp = reference.ema([s[name].numpy() for s in snapshots[1::2]], [0.4] * 3, x0.numpy())
        got = params[name.replace(".default.", ".ref.")].detach().double().numpy()
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
        assert not params[name.replace(".default.", ".ref.")].requires_grad


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="mixup_alpha must be"):
        ReferenceCallback(mixup_alpha=0.0)
    with pytest.raises(ValueError, match="sync_steps must be"):
        ReferenceCallback(sync_steps=0)
    with pytest.raises(TypeError, match="pass no update_every"):
        ReferenceCallback(update_every=3)


@pytest.mark.slow
def test_another_average_is_copied_into_the_reference_at_each_sync(tmp_path):
    """decay= (the BEMA hook): the average moves every step, the reference takes it every
    sync_steps (here at step 4 of 5: the reference is the average as of step 4)."""
    snapshots = []

    class Snapshot(trl.trainer.callbacks.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({k: v.detach().double().clone() for k, v in model.named_parameters()})

    model = dpo_llama()
    init = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    cb = ReferenceCallback(sync_steps=2, decay=0.5)
    trainer = dpo(tmp_path, model, copy.deepcopy(model), [Snapshot(), cb], max_steps=5)
    trainer.train()
    ref = dict(trainer.ref_model.named_parameters())
    for name, x0 in init.items():
        at4 = reference.ema([s[name].numpy() for s in snapshots[:4]], [0.5] * 4, x0.numpy())
        np.testing.assert_allclose(ref[name].detach().double().numpy(), at4, rtol=1e-5, atol=1e-6)
        at5 = reference.ema([s[name].numpy() for s in snapshots], [0.5] * 5, x0.numpy())
        got = cb.ema.averaged_tensors()[name].double().numpy()
        np.testing.assert_allclose(got, at5, rtol=1e-5, atol=1e-6)
