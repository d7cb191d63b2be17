"""Benchmark the NumPy EMA update (``polyak.ema_update_``) against the plain two-sided lerp.

    python benchmarks/numpy_lerp.py [--sizes 1000000 10000000] [--rounds 15]

``polyak.ema_update_`` on NumPy arrays returns a finite result for finite inputs also where
``value - avg`` overflows the dtype (float32 ``(-3e38, 3e38)``). It learns of an overflow from
the processor's floating-point overflow flag, which NumPy reads after every ufunc
(``errstate(over="raise")``), and recomputes the overflowed elements only then. This script
times it against the plain two-sided lerp without the test (what polyak did before), on
ordinary values (normal draws) and on inputs where 1 element in 1000 overflows, for float32 and
float64. Rounds interleave both candidates; a ratio is the median of per-round ratios. The
plain lerp skips ``ema_update_``'s argument checks (the same before and after the fix): the
1000-element row shows what they cost per call. Prints a Markdown table with the machine and
the load average; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

import polyak


def plain_lerp_(avg: np.ndarray, value: np.ndarray, weight: float) -> None:
    """The update without the overflow test (polyak before it; inf where ``value - avg``
    overflows)."""
    with np.errstate(invalid="ignore", over="ignore"):
        diff = value - avg
        if weight < 0.5:
            diff *= avg.dtype.type(weight)
            np.add(avg, diff, out=avg)
        else:
            diff *= avg.dtype.type(1.0 - weight)
            np.subtract(value, diff, out=avg)


def inputs(n: int, dtype: type, overflow: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    avg, value = rng.normal(size=n).astype(dtype), rng.normal(size=n).astype(dtype)
    if overflow:  # every 1000th pair's difference passes the dtype's max
        big = np.finfo(dtype).max * 0.9
        avg[::1000], value[::1000] = -big, big
    return avg, value


def time_pair(n: int, dtype: type, overflow: bool, rounds: int) -> tuple[float, float, float]:
    """Median ms of polyak and of the plain lerp, and the median per-round ratio."""
    avg, value = inputs(n, dtype, overflow, 0)
    runs: dict[str, Callable[[], None]] = {
        "polyak": lambda: polyak.ema_update_(avg, value, 0.999),
        "plain": lambda: plain_lerp_(avg, value, 0.001),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(rounds):
        for name, f in runs.items():
            if overflow:  # the previous call replaced the overflowing pairs by finite ones
                avg[:], value[:] = inputs(n, dtype, overflow, 0)
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    ratio = statistics.median(a / b for a, b in zip(times["polyak"], times["plain"]))
    return statistics.median(times["polyak"]) * 1e3, statistics.median(times["plain"]) * 1e3, ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), cpu)
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{cpu}, {os.cpu_count()} cores, NumPy {np.__version__}, load before {load}\n")
    print("| elements | dtype | inputs | polyak ms | plain lerp ms | ratio |")
    print("|---:|---|---|---:|---:|---:|")
    for n in args.sizes:
        for dtype in (np.float32, np.float64):
            for overflow in (False, True):
                ours, plain, ratio = time_pair(n, dtype, overflow, args.rounds)
                kind = "1/1000 overflow" if overflow else "normal"
                name = np.dtype(dtype).name
                print(f"| {n:,} | {name} | {kind} | {ours:.2f} | {plain:.2f} | {ratio:.3f} |")
    print(f"\nload after {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
