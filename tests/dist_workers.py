"""Worker functions for tests/test_distributed.py (run in spawned processes, gloo on CPU)."""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import polyak

# every torch.distributed function that communicates (FSDP2 uses all_gather_single etc.)
COLLECTIVES = tuple(
    n
    for n in dir(dist)
    if re.search(r"gather|scatter|reduce|broadcast|barrier|all_to_all|send|recv", n)
    and callable(getattr(dist, n))
    and not n[0].isupper()
)


def run(rank: int, world: int, init_file: str, fn: Callable[..., Any], *args: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        gc.collect()  # free DDP reducers etc. while the process group still exists
        dist.barrier()
    finally:
        dist.destroy_process_group()


class CountCollectives:
    """Counts calls of torch.distributed collectives while active."""

    def __init__(self) -> None:
        self.count = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CountCollectives:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def wrapped(*a: Any, _fn: Any = fn, **k: Any) -> Any:
                self.count += 1
                return _fn(*a, **k)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 3))


def sharded_net() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = net()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def set_weights_(model: nn.Module, step: int) -> None:
    """Write deterministic 'trained' weights for `step` (full tensors, or this rank's shards)."""
    from polyak._torch.sharding import local, shard_info, take_shard

    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            gen = torch.Generator().manual_seed(1000 * step + i)
            full = torch.randn(p.shape, generator=gen)
            info = shard_info(p)
            local(p).copy_(full if info is None else take_shard(full, info))


def fsdp_matches_unsharded(rank: int, world: int, out: str) -> None:
    """Train FSDP2 and an unsharded copy on the same global batches; compare the averages."""
    model, ref = sharded_net(), net()
    ema = polyak.EMA(model, [0.9, polyak.schedules.power(sigma_rel=0.1)])
    ref_ema = polyak.EMA(ref, [0.9, polyak.schedules.power(sigma_rel=0.1)], dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(7)
    counter = CountCollectives()
    train_collectives = 0
    for _ in range(8):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        with CountCollectives() as c:
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
            opt.zero_grad()
        train_collectives += c.count
        nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        with counter:
            ema.update()
        ref_ema.update()
    with torch.no_grad():
        model(torch.zeros(1, 6))  # a no_grad forward leaves the root unsharded...
    with counter:
        ema.update()  # ...the update reshards first (no communication)
    ref_ema.update()
    full = ema.state_dict(full=True)
    if rank == 0:
        assert full is not None
        torch.save(
            {
                "full": full,
                "ref": ref_ema.state_dict(),
                "update_collectives": counter.count,
                "train_collectives": train_collectives,
            },
            out,
        )


def swap_and_check(rank: int, world: int, out: str) -> None:
    """Swapped evaluation on a sharded model equals evaluation of the gathered average."""
    model = sharded_net()
    ema = polyak.EMA(model, 0.5)
    set_weights_(model, 1)
    ema.update()
    set_weights_(model, 2)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        live = model(x)  # leaves FSDP2's full weights registered
    late = polyak.EMA(model, 0.5)  # built now: it must take the shards, not the full weights
    late.update()
    with ema.swapped(model), torch.no_grad():
        averaged = model(x)
    with torch.no_grad():
        live_again = model(x)
    full = ema.state_dict(full=True)
    if rank == 0:
        torch.save(
            {
                "live": live,
                "averaged": averaged,
                "live_again": live_again,
                "full": full,
                "late_sharded": any(t.sharded for t in late.layout().values()),
            },
            out,
        )


def save_after(rank: int, world: int, out: str, steps: int, total: int) -> None:
    """Sharded run: `steps` updates then save the full state; also the uninterrupted result."""
    model = sharded_net()
    ema = polyak.EMA(model, {"c": 0.8, "w": polyak.schedules.warmup(0.99)}, update_every=2)
    for t in range(1, total + 1):
        set_weights_(model, t)
        ema.update()
        if t == steps:
            saved = ema.state_dict(full=True)
    final = ema.state_dict(full=True)
    if rank == 0:
        torch.save({"saved": saved, "final": final}, out)


def resume_sharded(rank: int, world: int, path: str, out: str, steps: int, total: int) -> None:
    model = sharded_net()
    ema = polyak.EMA(model, {"c": 0.8, "w": polyak.schedules.warmup(0.99)}, update_every=2)
    ema.load_state_dict(torch.load(path, weights_only=True)["saved"])
    for t in range(steps + 1, total + 1):
        set_weights_(model, t)
        ema.update()
    final = ema.state_dict(full=True)
    if rank == 0:
        torch.save(final, out)


def ddp_identical(rank: int, world: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model = DistributedDataParallel(base)
    ema = polyak.EMA(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(5):
        model(torch.randn(8, 6, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    flat = torch.cat(
        [
            v.reshape(-1).double()
            for k, v in ema.averaged_tensors().items()
            if "running" not in k and v.is_floating_point()
        ]
    )
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered), "averages differ across ranks"
    if rank == 0:
        torch.save({"ema": ema.state_dict(), "names": list(ema.averaged_tensors())}, out)


def load_mismatch(rank: int, world: int, path: str, out: str) -> None:
    model = sharded_net()
    ema = polyak.EMA(model, 0.5)
    state = torch.load(path, weights_only=True)
    if rank == 1:
        state["averages"]["0.5"]["2.weight"] = torch.zeros(4, 4)
    try:
        ema.load_state_dict(state)
    except Exception as e:  # record what each rank saw
        torch.save(f"{type(e).__name__}: {e}", f"{out}.{rank}")


def bn_batches(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + rank)
    return [torch.randn(16, 6, generator=gen) * (1 + rank) + rank for _ in range(3)]


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def recompute_bn_synced(rank: int, world: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(bn_net())
    ema = polyak.EMA(model, 0.9)
    with ema.swapped(model):
        polyak.recompute_bn(model.module, bn_batches(rank))  # this rank's batches only
    stats = torch.cat([ema.averaged_tensors()[k] for k in ("1.running_mean", "1.running_var")])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    assert torch.equal(gathered[0], gathered[1]), "BN statistics differ across ranks"
    if rank == 0:
        torch.save({k: v.clone() for k, v in ema.averaged_tensors().items()}, out)
