"""Worker functions for tests/test_methods_distributed.py: BEMA, SWAG and write-back under DDP
and FSDP2 (spawned processes, gloo on CPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import polyak
from dist_workers import CountCollectives, net, set_weights_, sharded_net
from polyak import schedules
from polyak.averages import bema
from polyak.workflows import WriteBack

DECAYS = {"bema": bema(0.6, 0.3), "plain": 0.9, "poly": schedules.polynomial(1.0)}


def batches(steps: int = 9) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(steps)
    ]


def train(model, ema, swag, rank=0, world=1) -> None:
    """SGD on the global batches (each rank its chunk), EMA and SWAG after each step, a PMA
    write-back of the BEMA average every 4 steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wb = WriteBack(every=4, unit="steps", average="bema", restart=True)
    for x, y in batches():
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        swag.update()
        wb.apply(ema, model, ema.step, "steps")


def ddp_methods(rank: int, world: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(net())
    ema = polyak.EMA(model, dict(DECAYS))
    swag = polyak.SWAG(model, rank=3)
    train(model, ema, swag, rank, world)
    bema_weights = {k: v.clone() for k, v in ema.averaged_state_dict("bema").items()}
    swag.sample(model, generator=torch.Generator().manual_seed(5))
    sampled = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    flat = torch.cat([v.reshape(-1) for v in sampled.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered), "samples differ across ranks"
    if rank == 0:
        torch.save(
            {"ema": ema.state_dict(), "bema": bema_weights, "swag": swag.state_dict(),
             "sampled": sampled},
            out,
        )  # fmt: skip


def fsdp_methods(rank: int, world: int, out: str) -> None:
    """Deterministic weights per step on FSDP2 shards: the BEMA average read through swapped()
    and the SWAG draw equal the unsharded ones; updates communicate nothing."""
    model = sharded_net()
    ema = polyak.EMA(model, dict(DECAYS))
    swag = polyak.SWAG(model, rank=3)
    counter = CountCollectives()
    for step in range(1, 8):
        set_weights_(model, step)
        with counter:
            ema.update()
            swag.update()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with ema.swapped(model, "bema"), torch.no_grad():
        bema_out = model(x)
    swag.sample(model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        swag_out = model(x)
    full = ema.state_dict(full=True)
    if rank == 0:
        torch.save(
            {"bema_out": bema_out, "swag_out": swag_out, "full": full,
             "collectives": counter.count},
            out,
        )  # fmt: skip
