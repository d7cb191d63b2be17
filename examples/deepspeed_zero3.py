"""EMA under DeepSpeed ZeRO-3 on CPU: shard-local averages, a sharded teacher, export.

    python examples/deepspeed_zero3.py --fast      # starts 2 CPU processes itself (gloo)
    torchrun --nproc_per_node=2 examples/deepspeed_zero3.py

Under ZeRO-3 each rank holds one flat partition of every parameter (``param.ds_tensor``).
``polyak.EMA(engine)`` averages this rank's partitions in place: ``ema.update()`` issues no
collective and keeps ``model / world`` bytes per rank. ``ema.swapped(engine)`` puts the averaged
partitions in place for an evaluation (the forward gathers them as usual) and gives the live
ones back bit for bit. ``ema.state_dict(full=True)`` gathers the average once (rank 0 gets it);
it loads into a plain model in one process, at another world size, under ZeRO-1/2 or FSDP2.
A teacher that must be a model of its own (``TargetEMA``) is a second ZeRO-3 engine, updated
partition by partition, with no collective either.

DeepSpeed on a CPU: ``DS_ACCELERATOR=cpu`` (communication over gloo), ``LOCAL_RANK`` set when
no launcher does, and ``build_shm_op`` (a C++ op for inference all-reduce that DeepSpeed
JIT-compiles in about two minutes when its CPU communication starts) replaced by a no-op.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch import nn

import polyak
from polyak.workflows import TargetEMA


def deepspeed_on_cpu(rank: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", str(rank))
    # DeepSpeed 0.19 calls collectives that torch 2.13 renamed: one warning per call
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import deepspeed
    import deepspeed.comm.torch  # the module object (the attribute is the torch package)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # not used by training
    deepspeed.init_distributed(dist_backend="gloo")


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    import deepspeed

    from polyak.cli.study.data import load_digits

    config = {
        "train_micro_batch_size_per_gpu": 32,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,  # a torch optimizer
        "steps_per_print": 10**9,
    }
    model = make_model(args.width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    teacher_engine, *_ = deepspeed.initialize(model=make_model(args.width), config=config)

    ema = polyak.EMA(engine, decay=polyak.schedules.warmup(0.99))  # this rank's partitions
    teacher = TargetEMA(teacher_engine, engine, decay=0.99)  # a model of its own, sharded too

    data = load_digits(seed=0)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    xv, yv = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    gen = torch.Generator().manual_seed(0)  # the same order on every rank...
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32 * world):
            if len(idx) < 32 * world:
                continue
            idx = idx.chunk(world)[rank]  # ...and each rank takes its part of every batch
            engine.backward(nn.functional.cross_entropy(engine(x[idx]), y[idx]))
            engine.step()
            ema.update()  # partition-local: no communication
            teacher.update()

    engine.eval()
    with torch.no_grad():
        live = nn.functional.cross_entropy(engine(xv), yv).item()
        with ema.swapped(engine):  # the averaged partitions, gathered by the forward
            averaged = nn.functional.cross_entropy(engine(xv), yv).item()
        taught = nn.functional.cross_entropy(teacher_engine(xv), yv).item()
    full = ema.state_dict(full=True)  # a collective: every rank calls it; rank 0 gets it
    held = ema.nbytes
    if rank == 0:
        assert full is not None
        plain = make_model(args.width)
        plain_ema = polyak.EMA(plain, decay=polyak.schedules.warmup(0.99))
        plain_ema.load_state_dict(full)  # the gathered average in a plain single-process EMA
        with torch.no_grad(), plain_ema.swapped(plain):
            reloaded = nn.functional.cross_entropy(plain(xv), yv).item()
        print(
            f"ZeRO-3, {world} ranks: val loss live {live:.4f}, averaged {averaged:.4f} "
            f"(reloaded in one process: {reloaded:.4f}), teacher {taught:.4f}"
        )
        print(
            f"average held per rank: {held / 1024:.1f} KiB, unsharded: "
            f"{plain_ema.nbytes / 1024:.1f} KiB"
        )
    engine.destroy()
    teacher_engine.destroy()


def _worker(rank: int, world: int, init: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        deepspeed_on_cpu(rank)
        train(rank, world, args)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a small run (CI)")
    parser.add_argument("--width", type=int, default=None, help="hidden width")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    args.width = args.width or (64 if args.fast else 512)
    args.epochs = args.epochs or (1 if args.fast else 10)
    if "RANK" in os.environ:  # launched by torchrun or deepspeed
        deepspeed_on_cpu(int(os.environ["RANK"]))
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
