"""DDP and FSDP2 on CPU: 2 processes, gloo. Shard-local averages, exact resume, named errors."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.multiprocessing as mp

import polyak
from dist_workers import net, run, set_weights_

pytestmark = [
    pytest.mark.slow,  # two processes per test
    pytest.mark.skipif(
        not torch.distributed.is_available() or sys.platform == "win32", reason="needs gloo"
    ),
]


def spawn(tmp_path, fn, *args, world=2):
    init = tmp_path / f"init-{fn.__name__}"
    mp.spawn(run, args=(world, str(init), fn, *args), nprocs=world, join=True)


def test_fsdp2_average_equals_unsharded_and_update_is_communication_free(tmp_path):
    from dist_workers import fsdp_matches_unsharded

    out = tmp_path / "fsdp.pt"
    spawn(tmp_path, fsdp_matches_unsharded, str(out))
    res = torch.load(out, weights_only=True)
    assert res["train_collectives"] > 0  # the counter does see FSDP's collectives
    assert res["update_collectives"] == 0
    for name in res["ref"]["averages"]:
        for k, ref in res["ref"]["averages"][name].items():
            got = res["full"]["averages"][name][k]
            assert got.dtype == torch.float32 and got.shape == ref.shape
            torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6, msg=f"{name} {k}")


def test_fsdp2_swapped_evaluation_uses_the_average_and_restores(tmp_path):
    from dist_workers import swap_and_check

    out = tmp_path / "swap.pt"
    spawn(tmp_path, swap_and_check, str(out))
    res = torch.load(out, weights_only=True)
    assert torch.equal(res["live"], res["live_again"])
    assert res["late_sharded"]  # an EMA built after a no_grad forward averages the shards
    plain = net()
    ema = polyak.EMA(plain, 0.5)
    ema.load_state_dict(res["full"])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with ema.swapped(plain), torch.no_grad():
        expected = plain(x)
    torch.testing.assert_close(res["averaged"], expected)
    assert not torch.allclose(res["live"], res["averaged"])


def test_save_at_two_ranks_resume_at_one_and_two_bit_for_bit(tmp_path):
    from dist_workers import resume_sharded, save_after

    saved = tmp_path / "saved.pt"
    spawn(tmp_path, save_after, str(saved), 5, 12)
    res = torch.load(saved, weights_only=True)
    # world size 1, unsharded model
    model = net()
    ema = polyak.EMA(model, {"c": 0.8, "w": polyak.schedules.warmup(0.99)}, update_every=2)
    ema.load_state_dict(res["saved"])
    for t in range(6, 13):
        set_weights_(model, t)
        ema.update()
    # world size 2 again
    out2 = tmp_path / "resumed2.pt"
    spawn(tmp_path, resume_sharded, str(saved), str(out2), 5, 12)
    again = torch.load(out2, weights_only=True)
    for name in ("c", "w"):
        for k, v in res["final"]["averages"][name].items():
            assert torch.equal(ema.averaged_tensors(name)[k], v), (1, name, k)
            assert torch.equal(again["averages"][name][k], v), (2, name, k)
    assert ema.step == 12 and again["timeline"]["step"] == 12


def test_ddp_averages_identical_across_ranks_and_rank0_checkpoint_loads_anywhere(tmp_path):
    from dist_workers import ddp_identical

    out = tmp_path / "ddp.pt"
    spawn(tmp_path, ddp_identical, str(out))
    res = torch.load(out, weights_only=True)
    assert "0.weight" in res["names"]  # canonical: no "module." prefix
    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    ema = polyak.EMA(plain, 0.9)
    ema.load_state_dict(res["ema"])
    assert ema.step == 5


def test_a_rank_that_cannot_load_raises_a_named_error_on_every_rank(tmp_path):
    from dist_workers import load_mismatch, save_after

    saved = tmp_path / "saved.pt"
    spawn(tmp_path, save_after, str(saved), 2, 2)
    state = torch.load(saved, weights_only=True)["saved"]
    single = {**state, "averages": {"0.5": state["averages"]["c"]}}
    single["timeline"] = {
        **state["timeline"],
        "schedules": {"0.5": {"kind": "constant", "decay": 0.5}},
        "last_decays": state["timeline"]["last_decays"][:1],  # one average now
    }
    path = tmp_path / "single.pt"
    torch.save(single, path)
    out = tmp_path / "err"
    spawn(tmp_path, load_mismatch, str(path), str(out))
    msg0 = torch.load(f"{out}.0", weights_only=True)
    msg1 = torch.load(f"{out}.1", weights_only=True)
    assert msg1.startswith("ValueError") and "2.weight" in msg1 and "(4, 4)" in msg1
    assert msg0.startswith("RuntimeError") and "rank 1" in msg0 and "2.weight" in msg0


def test_recompute_bn_under_ddp_gives_every_rank_the_statistics_of_all_batches(tmp_path):
    from dist_workers import bn_batches, bn_net, recompute_bn_synced

    out = tmp_path / "bn.pt"
    spawn(tmp_path, recompute_bn_synced, str(out))
    got = torch.load(out, weights_only=True)
    single = bn_net()
    polyak.recompute_bn(single, bn_batches(0) + bn_batches(1))  # one process, all batches
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(got[f"1.{k}"], getattr(single[1], k), rtol=1e-6, atol=1e-6)
    assert got["1.num_batches_tracked"].item() == 6
