"""BEMA, SWAG and write-back with 2 processes (gloo, CPU): DDP averages and draws equal the
single-process ones; under FSDP2 they are shard-local and equal the unsharded ones."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.multiprocessing as mp

import polyak
from dist_workers import net, run, set_weights_
from methods_workers import DECAYS, ddp_methods, fsdp_methods, train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available() or sys.platform == "win32", reason="needs gloo"
    ),
]


def _spawn(tmp_path, fn, out):
    init = tmp_path / f"init-{fn.__name__}"
    mp.spawn(run, args=(2, str(init), fn, str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def test_ddp_bema_swag_and_write_back_equal_one_process(tmp_path):
    res = _spawn(tmp_path, ddp_methods, tmp_path / "ddp.pt")
    model = net()
    ema = polyak.EMA(model, dict(DECAYS))
    swag = polyak.SWAG(model, rank=3)
    train(model, ema, swag)  # the whole batch in one process
    assert res["ema"]["timeline"] == ema.state_dict()["timeline"]  # restarts at the same steps
    for name in DECAYS:
        for k, v in ema.state_dict()["averages"][name].items():
            torch.testing.assert_close(res["ema"]["averages"][name][k], v, rtol=1e-5, atol=1e-6)
    for k, v in ema.averaged_state_dict("bema").items():
        torch.testing.assert_close(res["bema"][k], v, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(swag.state_dict()["rows"], res["swag"]["rows"]):
        for k, v in ours.items():
            torch.testing.assert_close(theirs[k], v, rtol=1e-5, atol=1e-6)
    swag.sample(model, generator=torch.Generator().manual_seed(5))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(res["sampled"][k], v, rtol=1e-5, atol=1e-6)


def test_fsdp2_bema_and_swag_are_shard_local_and_equal_the_unsharded_ones(tmp_path):
    res = _spawn(tmp_path, fsdp_methods, tmp_path / "fsdp.pt")
    assert res["collectives"] == 0
    model = net()
    ema = polyak.EMA(model, dict(DECAYS))
    swag = polyak.SWAG(model, rank=3)
    for step in range(1, 8):
        set_weights_(model, step)
        ema.update()
        swag.update()
    for name in DECAYS:
        for k, v in ema.state_dict()["averages"][name].items():
            torch.testing.assert_close(res["full"]["averages"][name][k], v, rtol=0, atol=1e-6)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with ema.swapped(model, "bema"), torch.no_grad():
        torch.testing.assert_close(res["bema_out"], model(x), rtol=1e-5, atol=1e-6)
    swag.sample(model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(res["swag_out"], model(x), rtol=1e-5, atol=1e-6)
