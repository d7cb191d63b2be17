"""Benchmark the per-update cost of BEMA and SWAG against the plain EMA on ``polyak bench``'s
transformer (20.2M float32 parameters in 399 tensors, ``src/polyak/cli/bench/models.py``).

    python benchmarks/methods.py [--rounds 30] [--quick] [--output-dir benchmarks/results]

Candidates, each built on its own copy of the model and called once per round, rounds in a
shuffled order, the live weights nudged before every call (as an optimizer step would):

* ``ema``: ``polyak.EMA(model, 0.999).update()``, the reference;
* ``bema``: ``polyak.EMA(model, polyak.averages.bema()).update()``: the goal is <= 1.1x the
  EMA's update (the correction is paid when the average is read);
* ``swag (K=10)``: ``polyak.SWAG(model, rank=10).update()``, a collection at every step: the
  goal is <= (K + 2) / 2 = 6x the EMA's update;
* read costs, once per round: BEMA's ``averaged_state_dict()`` (one corrected copy),
  ``apply_shadow()`` and ``restore()`` (what ``swapped()`` does); SWAG's ``sample()``
  (low-rank, K=10).

Ratios are medians of per-round ratios (a slow spell of the shared machine hits both sides).
Writes ``<date>_methods_<cpu>_<cores>c_torch-<v>_py<v>.{json,md}``; the load (``uptime``) before
and after the run is in the file.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

import polyak
from polyak.averages import bema
from polyak.cli.bench.models import build_model, describe
from polyak.cli.common import load, machine, result_stem, versions, write_result

RANK = 10
GOALS = {"bema": 1.10, f"swag (K={RANK})": (RANK + 2) / 2}


def _nudge(model: torch.nn.Module) -> Callable[[], None]:
    params = [p for p in model.parameters()]

    def step() -> None:
        with torch.no_grad():
            torch._foreach_add_(params, 1e-4)

    return step


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a smaller model, 5 rounds")
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared 2-core machine OpenMP waits dominate)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = 0.25 if args.quick else 1.0
    rounds = 5 if args.quick else args.rounds
    load_before = load()

    models = {name: build_model("transformer", scale=scale) for name in ("ema", "bema", "swag")}
    ema = polyak.EMA(models["ema"], 0.999)
    corrected = polyak.EMA(models["bema"], bema())
    swag = polyak.SWAG(models["swag"], rank=RANK)
    steps = {k: _nudge(m) for k, m in models.items()}
    updates: dict[str, Callable[[], object]] = {
        "ema": ema.update,
        "bema": corrected.update,
        f"swag (K={RANK})": swag.update,
    }
    nudges = {"ema": steps["ema"], "bema": steps["bema"], f"swag (K={RANK})": steps["swag"]}
    reads: dict[str, Callable[[], object]] = {
        "bema averaged_state_dict": lambda: corrected.averaged_state_dict(),
        "bema apply_shadow+restore": lambda: (corrected.apply_shadow(), corrected.restore()),
        f"swag sample (K={RANK})": lambda: swag.sample(generator=torch.Generator().manual_seed(0)),
    }
    for _ in range(RANK + 2):  # warm up; SWAG fills its columns
        for name, fn in updates.items():
            nudges[name]()
            fn()
    times: dict[str, list[float]] = {k: [] for k in [*updates, *reads]}
    order = list(updates)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            nudges[name]()
            times[name].append(_timed(updates[name]))
        for name, fn in reads.items():
            times[name].append(_timed(fn))
    sizes = describe(models["ema"])
    ratios = {
        name: statistics.median(a / b for a, b in zip(times[name], times["ema"]))
        for name in updates
        if name != "ema"
    }
    result = {
        "benchmark": "methods",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], "benchmarks/methods.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "load_before": load_before,
        "load_after": load(),
        "versions": versions(),
        "model": {"shape": "transformer", "scale": scale, **sizes},
        "rounds": rounds,
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio_to_ema": ratios,
        "goals": {
            k: {"goal": g, "ratio": ratios[k], "met": ratios[k] <= g} for k, g in GOALS.items()
        },
        "memory_bytes": {
            "ema": ema.nbytes, "bema": corrected.nbytes, f"swag (K={RANK})": swag.nbytes
        },
    }  # fmt: skip
    lines = [
        "# BEMA and SWAG updates against the plain EMA",
        "",
        f"Model: polyak bench's transformer, {sizes['params']} parameters in "
        f"{sizes['param_tensors']} tensors (scale {scale}); {rounds} rounds; machine "
        f"{result['machine']['cpu']} "
        f"({result['machine']['cores']} cores, torch threads {args.threads}); load before "
        f"{load_before}, after {result['load_after']}.",
        "",
        "| candidate | median ms | ratio to EMA | goal | met | memory MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name in updates:
        goal = GOALS.get(name)
        lines.append(
            f"| {name} update | {result['median_ms'][name]:.2f} | "
            f"{ratios.get(name, 1.0):.2f} | {'' if goal is None else f'<= {goal:.2f}'} | "
            f"{'' if goal is None else ('yes' if ratios[name] <= goal else 'no')} | "
            f"{result['memory_bytes'][name] / 2**20:.0f} |"
        )
    for name in reads:
        lines.append(f"| {name} | {result['median_ms'][name]:.2f} | | | | |")
    markdown = "\n".join(lines) + "\n"
    stem = result_stem(result["machine"], result["versions"], kind="methods")
    for path in write_result(args.output_dir, stem, result, markdown):
        print(path)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
