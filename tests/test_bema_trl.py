"""polyak's BEMA against TRL's BEMACallback (trl 1.16), both in one real transformers Trainer on
a tiny GPT-2: the weights TRL's running model holds equal polyak's corrected average."""

from __future__ import annotations

import pytest
import torch
from trl import BEMACallback

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
