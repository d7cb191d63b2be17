"""EMA under DDP and FSDP2 on CPU (gloo): shard-local averages, swapped evaluation, export.

    torchrun --nproc_per_node=2 examples/ddp_fsdp2.py            # FSDP2 (fully_shard)
    torchrun --nproc_per_node=2 examples/ddp_fsdp2.py --ddp      # DistributedDataParallel
    python examples/ddp_fsdp2.py --fast                           # starts 2 processes itself

Under FSDP2 each rank averages only the shard of each parameter it owns: ``ema.update()`` issues
no collective. ``ema.state_dict(full=True)`` gathers the full average once (rank 0 gets it) for
export; it loads into an unsharded model or at any world size. Under DDP every rank keeps an
identical average without communicating; rank 0 saves it.

The script also times ``ema.update()`` on the sharded model against an unsharded EMA of the same
total size in one process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

import polyak


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def median_update_ms(ema: polyak.EMA, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ema.update()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    from polyak.cli.study.data import load_digits

    model = make_model(args.width)
    if args.ddp:
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    ema = polyak.EMA(model, decay=polyak.schedules.warmup(0.99))  # after wrapping: sees shards
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    data = load_digits(seed=0)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    xv, yv = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    gen = torch.Generator().manual_seed(0)  # the same order on every rank...
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            if len(idx) < world:
                continue
            idx = idx.chunk(world)[rank]  # ...and each rank takes its part of every batch
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
            ema.update()  # shard-local, no communication
    with torch.no_grad():
        live = nn.functional.cross_entropy(model(xv), yv).item()
        with ema.swapped(model):
            averaged = nn.functional.cross_entropy(model(xv), yv).item()
    held = ema.nbytes
    sharded_ms = median_update_ms(ema, args.repeats)
    full = ema.state_dict(full=True)  # collective: every rank calls it; rank 0 gets the result
    if rank == 0:
        assert full is not None
        plain = make_model(args.width)
        plain_ema = polyak.EMA(plain, decay=polyak.schedules.warmup(0.99))
        plain_ema.load_state_dict(full)  # the full average loads into an unsharded model
        unsharded_ms = median_update_ms(plain_ema, args.repeats)
        kind = "DDP" if args.ddp else "FSDP2"
        print(f"{kind}, {world} ranks: val loss live {live:.4f}, averaged {averaged:.4f}")
        print(
            f"average held per rank: {held / 2**20:.2f} MiB (unsharded: "
            f"{plain_ema.nbytes / 2**20:.2f} MiB); update {sharded_ms:.3f} ms per rank vs "
            f"{unsharded_ms:.3f} ms unsharded"
        )
        if args.out:
            torch.save(full, args.out)


def _worker(rank: int, world: int, init: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        train(rank, world, args)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ddp", action="store_true", help="DDP instead of FSDP2")
    parser.add_argument("--fast", action="store_true", help="a few seconds (CI)")
    parser.add_argument("--width", type=int, default=None, help="hidden width")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed updates")
    parser.add_argument("--out", default=None, help="save the full average here (rank 0)")
    args = parser.parse_args(argv)
    args.width = args.width or (128 if args.fast else 1024)
    args.epochs = args.epochs or (1 if args.fast else 5)
    args.repeats = args.repeats or (5 if args.fast else 50)
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, f"{tmp}/init", args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
