"""Worker for tests/test_posthoc_distributed.py (spawned processes, gloo on CPU)."""

from __future__ import annotations

import torch

import polyak
from dist_workers import net, set_weights_, sharded_net


def fsdp_and_ddp_stores(rank: int, world: int, sharded_dir: str, replicated_dir: str, out: str):
    """FSDP2: every rank writes its shards; replicated (DDP-like): only rank 0 writes."""
    model = sharded_net()
    ph = polyak.PostHocEMA(
        model, sharded_dir, snapshot_every=5, snapshot_dtype=torch.float32, keep_live=True
    )
    replicated = net()
    ph_rep = polyak.PostHocEMA(replicated, replicated_dir, snapshot_every=5)
    for step in range(1, 31):
        set_weights_(model, step)
        set_weights_(replicated, step)
        ph.update()
        ph_rep.update()
    ph.close()
    ph_rep.close()
    torch.distributed.barrier()  # every rank's files are in place
    mine = polyak.posthoc.reconstruct(sharded_dir, sigma_rel=0.08, rank=rank)
    torch.save(
        {
            "mine": dict(mine),
            "shards": mine.shards,
            "run_id": ph.run_id,
            "local": {k: v.clone() for k, v in ph.ema.averaged_tensors(ph.ema.names[0]).items()},
        },
        f"{out}.{rank}",
    )
