"""Post-hoc EMA under FSDP2 and replicated data parallelism: 2 processes, gloo on CPU."""

from __future__ import annotations

import json
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


def test_fsdp2_ranks_write_their_shards_and_one_process_gathers_them(tmp_path):
    from posthoc_workers import fsdp_and_ddp_stores

    sharded, replicated, out = tmp_path / "sharded", tmp_path / "replicated", tmp_path / "out"
    mp.spawn(
        run,
        args=(
            2,
            str(tmp_path / "init"),
            fsdp_and_ddp_stores,
            str(sharded),
            str(replicated),
            str(out),
        ),
        nprocs=2,
        join=True,
    )
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert parts[0]["run_id"] == parts[1]["run_id"]  # one run id, broadcast from rank 0
    manifests = [json.loads((sharded / f"manifest.rank{r}.json").read_text()) for r in range(2)]
    assert [m["rank"] for m in manifests] == [0, 1] and all(m["world_size"] == 2 for m in manifests)
    assert all(
        f"-rank{r}.safetensors" in s["files"]["sigma0.05"]["name"]
        for r, m in enumerate(manifests)
        for s in m["snapshots"]
    )
    # the same weights, unsharded, in one process
    model = net()
    ph = polyak.PostHocEMA(
        model, tmp_path / "single", snapshot_every=5, snapshot_dtype=torch.float32
    )
    for step in range(1, 31):
        set_weights_(model, step)
        ph.update()
    ph.close()
    single = polyak.posthoc.reconstruct(tmp_path / "single", sigma_rel=0.08)
    full = polyak.posthoc.reconstruct(sharded, sigma_rel=0.08)  # gathered, no process group
    assert full.rank is None and full.shards is None and list(full) == list(single)
    for name, value in single.items():
        torch.testing.assert_close(full[name], value, rtol=0, atol=1e-6, msg=name)
        for part in parts:  # each rank's own reconstruction is its slice
            shard = part["shards"].get(name)
            piece = (
                value
                if shard is None
                else value.narrow(0, shard["offset"][0], shard["local_shape"][0])
            )
            torch.testing.assert_close(part["mine"][name], piece, rtol=0, atol=1e-6)
    # the live shards each rank read from its model, gathered: the weights of the last step
    lawa = polyak.posthoc.window_average(sharded, 1)
    assert list(lawa) == list(model.state_dict())
    assert all(torch.equal(lawa[k], v) for k, v in model.state_dict().items())
    # replicated averages: rank 0 alone wrote an ordinary store
    assert sorted(p.name for p in replicated.glob("manifest*")) == ["manifest.json"]
    rep = polyak.posthoc.reconstruct(replicated, sigma_rel=0.08)
    for name, value in single.items():
        torch.testing.assert_close(rep[name], value, rtol=0, atol=2e-3)  # float16 files
    with pytest.raises(ValueError, match="ranks 0..1"):
        polyak.posthoc.reconstruct(sharded, sigma_rel=0.08, rank=2)
