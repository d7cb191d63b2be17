"""polyak's BEMA against TRL's BEMACallback (trl 1.16), both in one real transformers Trainer on
a tiny GPT-2: the weights TRL's running model holds equal polyak's corrected average."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import TrainerCallback
from trl import BEMACallback

import reference
from polyak.averages import bema
from polyak.integrations.transformers import EMACallback
from test_integrations_transformers import hf_trainer


@pytest.mark.parametrize(
    "trl_args, every",
    [
        ({"update_freq": 1}, 1),
        pytest.param(
            {"update_freq": 3, "ema_power": 0.7, "bias_power": 0.3, "lag": 2, "multiplier": 2.0},
            3,
            marks=pytest.mark.slow,
        ),
        pytest.param(
            {"update_freq": 1, "update_after": 3, "min_ema_multiplier": 0.2},
            1,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_polyak_bema_equals_trls_bema_callback(tmp_path, trl_args, every):
    trl = BEMACallback(**trl_args)
    ours = EMACallback(
        decay=bema(
            trl_args.get("ema_power", 0.5),
            trl_args.get("bias_power", 0.2),
            lag=trl_args.get("lag", 10),
            multiplier=trl_args.get("multiplier", 1.0),
            min_ema_multiplier=trl_args.get("min_ema_multiplier", 0.0),
            anchor_step=trl_args.get("update_after", 0),
            per_update=every > 1,  # TRL applies beta_t once per update_freq steps
        ),
        update_every=every,
    )
    trainer = hf_trainer(tmp_path, callbacks=[trl, ours], max_steps=6)
    trainer.train()
    assert ours.ema is not None and ours.ema.step == 6
    corrected = ours.ema.averaged_state_dict()
    raw = ours.ema.averaged_tensors()
    differs = False
    for name, param in trl.running_model.named_parameters():
        torch.testing.assert_close(corrected[name], param.detach(), rtol=1e-5, atol=1e-6)
        differs |= not torch.allclose(raw[name], param.detach(), atol=1e-4)
    assert differs  # the correction matters: the stored EMA part alone is not TRL's output


def _bema_reference_run(tmp_path, policy, ref_model, spec, sync_steps=2, steps=6):
    """A DPO run with ``ReferenceCallback(decay=spec)``; after each optimizer step, the
    trained parameters and the reference's (as the next forward sees it), in float64."""
    from polyak.integrations.trl import ReferenceCallback
    from test_integrations_trl import dpo

    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    policy_steps = [{n: p.detach().double().clone() for n, p in policy.named_parameters()}]
    reference_steps = []
    trainer = None

    class Snapshot(TrainerCallback):  # after ReferenceCallback: sees the synced reference
        def on_step_end(self, args, state, control, model=None, **kwargs):
            params = dict(model.named_parameters())
            policy_steps.append({n: params[n].detach().double().clone() for n in trained})
            ref = trainer.ref_model if trainer.ref_model is not None else model
            reference_steps.append(
                {n: p.detach().double().clone() for n, p in ref.named_parameters()}
            )

    cb = ReferenceCallback(sync_steps=sync_steps, decay=spec)
    trainer = dpo(tmp_path, policy, ref_model, [cb, Snapshot()], max_steps=steps)
    trainer.train()
    assert cb.ema.step == steps and cb.ema.timeline.num_updates == steps
    return trained, policy_steps, reference_steps


@pytest.mark.slow
def test_a_bema_reference_is_the_float64_bema_of_each_sync_step(tmp_path):
    """ReferenceCallback(decay=bema(...)) in a real DPOTrainer: at every step the reference the
    trainer evaluates is Block & Zhang's BEMA (float64, from the policy's own trajectory) of
    the last sync step, the policy's initial weights before the first sync."""
    from finetune_helpers import dpo_llama

    spec = bema(0.5, 0.2, lag=2.0)  # beta and alpha move visibly within 6 steps
    policy = dpo_llama()
    trained, thetas, refs = _bema_reference_run(tmp_path, policy, copy.deepcopy(policy), spec)
    for name in trained:
        want = reference.bema([th[name].numpy() for th in thetas], spec)
        for t, ref in enumerate(refs, start=1):
            sync = t - t % 2
            expected = want[sync] if sync else thetas[0][name].numpy()
            np.testing.assert_allclose(ref[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    last = {
        n: torch.from_numpy(reference.bema([th[n].numpy() for th in thetas], spec)[6])
        for n in trained
    }
    plain = {n: thetas[-1][n] for n in trained}  # the correction is not a no-op here
    assert any(not torch.allclose(last[n], plain[n], atol=1e-4) for n in trained)


@pytest.mark.slow
def test_a_peft_bema_reference_adapter_is_the_corrected_average(tmp_path):
    """With a PEFT policy the "ref" adapter takes the corrected BEMA of the trained adapter at
    each sync (not the stored EMA part)."""
    from finetune_helpers import dpo_llama, lora

    spec = bema(0.5, 0.0, lag=2.0)  # alpha = 1: the corrected reference is far from the EMA part
    policy = lora(dpo_llama())
    trained, thetas, refs = _bema_reference_run(tmp_path, policy, None, spec)
    assert trained and all(".default." in n for n in trained)
    for name in trained:
        want = reference.bema([th[name].numpy() for th in thetas], spec)
        target = name.replace(".default.", ".ref.")
        for t, ref in enumerate(refs, start=1):
            sync = t - t % 2
            expected = want[sync] if sync else thetas[0][name].numpy()
            np.testing.assert_allclose(ref[target].numpy(), expected, rtol=1e-5, atol=1e-6)
