"""An EMA under DeepSpeed ZeRO-3, 2 CPU processes: bytes, collectives and time per update.
``python benchmarks/zero3.py [--quick]``.

A stack of ``Linear(width, width)`` layers trained by a ZeRO-3 engine (gloo, SGD) on 2 spawned
processes. Three ways to keep an EMA of it, each updated after ``engine.step()``:

* ``polyak``: ``polyak.EMA(engine)``, each rank averaging its own partition (``ds_tensor``);
* ``bare``: ``torch._foreach_lerp_`` of float32 copies of the same partitions (the floor: what
  an update must do at least), goal ``polyak <= 1.10x bare``;
* ``gather``: a full-size copy of the model on every rank, each parameter gathered for its
  update (``deepspeed.zero.GatheredParameters(p)``, as diffusers' ``EMAModel.step`` does under
  ZeRO-3).

Reported per rank: the bytes of the averages (against the model's full bytes over the world
size), the collectives per update (calls of ``torch.distributed`` and ``deepspeed.comm``
collectives counted while updating), and the median time of one update (timed over blocks of 10
updates, the blocks of the three ways interleaved, each first in turn; the slower rank's
median). Results: ``benchmarks/results/<date>_zero3_...``
(json and markdown) with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import polyak
from polyak.cli.common import machine, result_stem, versions, write_result

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 2
DECAY = 0.999
BLOCK = 10  # updates timed together, between barriers
_COLLECTIVE = re.compile(r"gather|scatter|reduce|broadcast|barrier|all_to_all|send|recv")


def _setup(rank: int, init_file: str) -> None:
    """DeepSpeed on CPU without a launcher: the CPU accelerator (gloo), LOCAL_RANK set, and
    ``build_shm_op`` (a two-minute C++ build used only by inference all-reduce) skipped."""
    os.environ.update(
        DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import deepspeed
    import deepspeed.comm.torch  # the module object (deepspeed.comm.torch is torch itself)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    deepspeed.init_distributed(dist_backend="gloo")


class _Counter:
    """Counts calls of the collectives of ``torch.distributed`` and ``deepspeed.comm``."""

    def __init__(self) -> None:
        import deepspeed.comm as ds_comm

        self.count = 0
        self.targets = [
            (module, name)
            for module in (dist, ds_comm)
            for name in dir(module)
            if _COLLECTIVE.search(name) and not name[0].isupper() and not name.startswith("_")
            if callable(getattr(module, name))
        ]

    def __enter__(self) -> _Counter:
        self.saved = [(m, n, getattr(m, n)) for m, n in self.targets]
        for module, name, fn in self.saved:

            def wrapped(*a: Any, _fn: Any = fn, **k: Any) -> Any:
                self.count += 1
                return _fn(*a, **k)

            setattr(module, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, fn in self.saved:
            setattr(module, name, fn)


def _worker(rank: int, init_file: str, width: int, layers: int, rounds: int, out: str) -> None:
    _setup(rank, init_file)
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3},
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,  # a torch optimizer
    }
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    x = torch.randn(4, width)

    def step() -> None:
        engine.backward(engine(x).square().mean())
        engine.step()

    step()
    params = list(engine.module.parameters())
    full_bytes = sum(p.ds_numel * p.ds_tensor.element_size() for p in params)

    ema = polyak.EMA(engine, decay=DECAY)
    # this rank's valid part of each partition (the last ranks' tails are padding)
    sizes = [p.ds_tensor.numel() for p in params]
    parts = [
        p.ds_tensor.narrow(0, 0, max(0, min(n, p.ds_numel - rank * n)))
        for p, n in zip(params, sizes)
    ]
    shadows = [t.detach().float().clone() for t in parts]
    full = [torch.empty(p.ds_shape, dtype=torch.float32) for p in params]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for f, p in zip(full, params):
            f.copy_(p.data)

    def bare() -> None:
        torch._foreach_lerp_(shadows, parts, 1 - DECAY)

    def gather() -> None:  # one gather per parameter, a full copy on every rank
        for f, p in zip(full, params):
            with deepspeed.zero.GatheredParameters(p, modifier_rank=None):
                f.lerp_(p.data, 1 - DECAY)

    ways = {"polyak": ema.update, "bare": bare, "gather": gather}
    counts = {}
    for name, fn in ways.items():
        with _Counter() as c:
            for _ in range(3):
                fn()
        counts[name] = c.count / 3
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(rounds):
        if i % 5 == 0:
            step()  # the partitions change between updates, as in training
        order = list(ways)[i % 3 :] + list(ways)[: i % 3]  # each way first as often (caches)
        for name in order:
            fn = ways[name]
            dist.barrier()  # not timed, nor right before a timed call: a block of updates
            t0 = time.perf_counter()
            for _ in range(BLOCK):
                fn()
            times[name].append((time.perf_counter() - t0) / BLOCK)
    row = {
        "rank": rank,
        "full_model_bytes": full_bytes,
        "bytes": {
            "polyak": ema.nbytes,
            "bare": sum(t.numel() * t.element_size() for t in shadows),
            "gather": sum(t.numel() * t.element_size() for t in full),
        },
        "collectives_per_update": counts,
        "median_us": {n: statistics.median(t) * 1e6 for n, t in times.items()},
    }
    rows: list[Any] = [None] * WORLD
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()


def measure(width: int, layers: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        args = (os.path.join(d, "init"), width, layers, rounds, out)
        mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
        ranks = json.loads(Path(out).read_text())
    slow = {n: max(r["median_us"][n] for r in ranks) for n in ranks[0]["median_us"]}
    return {
        "width": width,
        "layers": layers,
        "parameters": layers * (width * width + width),
        "world": WORLD,
        "rounds": rounds,
        "ranks": ranks,
        "median_us": slow,
        "polyak_over_bare": slow["polyak"] / slow["bare"],
        "gather_over_polyak": slow["gather"] / slow["polyak"],
        "bytes_over_model_per_world": max(r["bytes"]["polyak"] for r in ranks)
        / (ranks[0]["full_model_bytes"] / WORLD),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small model, few rounds")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    shapes = [(257, 3)] if args.quick else [(257, 3), (1024, 8)]
    rounds = 10 if args.quick else 60
    before = machine()["load"]
    rows = [measure(w, n, rounds) for w, n in shapes]
    m, v = machine(), versions(("polyak", "torch", "deepspeed"))
    m["load_before"] = before
    lines = [
        "# EMA under DeepSpeed ZeRO-3: 2 CPU processes (gloo), one update after each step",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, load {before} before and {m['load']} after "
        f"(1/5/15 min) at {m['date']}; 1 torch thread per process; versions {v}.",
        "",
        "| model | params | per-rank bytes polyak / bare / gather (model/world) | collectives "
        "per update polyak / bare / gather | update us polyak / bare / gather | polyak / bare "
        "| gather / polyak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = max(r["ranks"], key=lambda x: x["bytes"]["polyak"])["bytes"]
        c, t = r["ranks"][0]["collectives_per_update"], r["median_us"]
        lines.append(
            f"| {r['layers']} x Linear({r['width']}) | {r['parameters']:,} | {b['polyak']:,} / "
            f"{b['bare']:,} / {b['gather']:,} ({r['ranks'][0]['full_model_bytes'] // WORLD:,}) "
            f"| {c['polyak']:g} / {c['bare']:g} / {c['gather']:g} | {t['polyak']:.0f} / "
            f"{t['bare']:.0f} / {t['gather']:.0f} | {r['polyak_over_bare']:.2f}x | "
            f"{r['gather_over_polyak']:.1f}x |"
        )
    markdown = "\n".join(lines) + "\n"
    stem = result_stem(m, v, "zero3", tag="quick" if args.quick else "")
    out = write_result(args.out, stem, {"machine": m, "versions": v, "rows": rows}, markdown)
    print(markdown)
    print("written:", *out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
