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


def retention_writer(directory: str, steps: int, ready, done) -> None:
    """A live run for the race test: a snapshot every step, Retention thinning old ones (so
    files the readers may be reading are deleted all the time); ``ready`` once there are a few
    snapshots, ``done`` at the end."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    ph = polyak.PostHocEMA(
        model,
        directory,
        snapshot_every=1,
        snapshot_dtype=torch.float32,
        retention=polyak.posthoc.Retention(every=8, older_than=4),
    )
    try:
        for step in range(1, steps + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            ph.update()
            if step == 10:
                ph.wait()
                ready.set()
        ph.close()
    finally:
        ready.set()
        done.set()


def race(directory, steps: int = 400) -> tuple[int, dict[str, int]]:
    """Reconstruct from ``directory`` while :func:`retention_writer` writes it in another
    process; ``(reads, {error: count})`` of the reads made while it ran."""
    import multiprocessing
    import warnings

    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=retention_writer, args=(str(directory), steps, ready, done))
    writer.start()
    reads, failures = 0, {}
    try:
        assert ready.wait(120), "the writer did not start"
        while not done.is_set():
            reads += 1
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    polyak.posthoc.reconstruct(directory, sigma_rel=0.08)
            except Exception as e:
                key = f"{type(e).__name__}: {str(e).split(':')[-1].strip()[:50]}"
                failures[key] = failures.get(key, 0) + 1
    finally:
        writer.join(120)
    assert writer.exitcode == 0, writer.exitcode
    return reads, failures
