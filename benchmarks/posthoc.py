"""Post-hoc EMA at scale: reconstruction vs reading the snapshots once, and the snapshot stall.

    python benchmarks/posthoc.py                 # 100M parameters, 40 snapshots (~16 GB on disk)
    python benchmarks/posthoc.py --quick         # 10M parameters, 10 snapshots (a smoke test)

1. A 100M-parameter model (GPT-2-like shapes, built from a config) is "trained" by a
   ``PostHocEMA`` (sigma_rel 0.05 and 0.10, float16 snapshots) that writes 40 snapshots. Every
   update is timed: a snapshot step's ``update()`` (the host copy; the previous write is over)
   against a plain step's.
2. Reading: every snapshot file read once, front to back (8 MiB ``readinto``), and
   ``reconstruct_many`` of 4 targets on the same files, alternately, each "cold" (the files
   evicted from the page cache with ``posix_fadvise(DONTNEED)``) and "hot" (just read).
   Each reconstruction runs in a child process that reports its time and peak memory above its
   baseline, to compare with the budget ``(outputs + 1) x fp32 model + one snapshot``.
3. Precision (``posthoc_precision.py``): reconstruction error vs number of snapshots on a
   synthetic stream, and the extra error of float16/bfloat16 snapshots on real training.

Files go to ``.bench-tmp/`` (git-ignored) and are deleted at the end; results to
``benchmarks/results/`` (machine and versions in the name, JSON + Markdown + PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import polyak
from polyak.cli.common import evict_page_cache, machine, versions

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [0.05, 0.08, 0.12, 0.2]  # within the stored widths (narrower ones warn in float16)


def gpt_like(params: float) -> nn.Module:
    """GPT-2-small shapes (width 768, vocab 32000) with as many blocks as give ``params``."""
    width, vocab = 768, 32000

    def block() -> nn.Module:
        return nn.ModuleList(
            [
                nn.LayerNorm(width),
                nn.Linear(width, 3 * width),
                nn.Linear(width, width),
                nn.LayerNorm(width),
                nn.Linear(width, 4 * width),
                nn.Linear(4 * width, width),
            ]
        )

    per_block = sum(p.numel() for p in block().parameters())
    blocks = max(1, round((params - vocab * width) / per_block))
    return nn.ModuleList([nn.Embedding(vocab, width), *[block() for _ in range(blocks)]])


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_all(files: list[Path]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to read every file once, front to back."""
    buf = bytearray(8 << 20)
    start, cpu = time.perf_counter(), _cpu()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start, _cpu() - cpu


def _child(directory: str, threads: int) -> None:
    """Run one reconstruct_many and print its time and peak memory (JSON)."""
    torch.set_num_threads(threads)
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    start, cpu = time.perf_counter(), _cpu()
    out = polyak.posthoc.reconstruct_many(directory, TARGETS)
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    fits = [r.fit for r in out.values()]
    extra = (peak - before) * 1024
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "extra_bytes": extra, "fits": fits}))


def _reconstruct(directory: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(directory), "--threads", str(threads)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def train(model: nn.Module, directory: Path, snapshots: int, every: int) -> dict:
    """Snapshots written by a PostHocEMA; times of plain and snapshot updates.

    The step before each snapshot first waits for the previous write, so that it and the
    snapshot step both run with no write in the background: their difference is the stall.
    The other steps run while a write is in progress (timed too: the write's cost to them).
    """
    ph = polyak.PostHocEMA(model, directory, snapshot_every=every)
    quiet, stall, busy, wait = [], [], [], []
    params = list(model.parameters())
    with torch.no_grad():
        for step in range(1, snapshots * every + 1):
            torch._foreach_add_(params, 1e-4)  # the "optimizer step"
            phase = step % every
            if phase == every - 1:
                start = time.perf_counter()
                ph.wait()  # the previous write, in the background since the last snapshot
                wait.append(time.perf_counter() - start)
            start = time.perf_counter()
            ph.update()
            elapsed = time.perf_counter() - start
            {0: stall, every - 1: quiet}.get(phase, busy).append(elapsed)
    ph.close()
    return {
        "plain_update_s": statistics.median(quiet),
        "snapshot_update_s": statistics.median(stall),
        "stall_s": statistics.median(stall) - statistics.median(quiet),
        "update_during_write_s": statistics.median(busy),
        "wait_for_previous_write_s": statistics.median(wait[1:]),
        "ema_bytes": ph.ema.nbytes,
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    tmp = ROOT / ".bench-tmp" / "posthoc"
    shutil.rmtree(tmp, ignore_errors=True)
    model = gpt_like(args.params)
    n = sum(p.numel() for p in model.parameters())
    result: dict = {"machine": machine(), "versions": versions(), "load": [os.getloadavg()]}
    result["config"] = {**vars(args), "params": n, "targets": TARGETS}
    print(f"model: {n / 1e6:.1f}M parameters, {len(list(model.parameters()))} tensors", flush=True)
    result["updates"] = train(model, tmp / "store", args.snapshots, args.every)
    print("updates:", result["updates"], flush=True)
    files = sorted((tmp / "store").glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    result["store"] = {"files": len(files), "bytes": size}
    rows = []
    for rep in range(args.repeats):
        for cache in ("cold", "hot"):
            if cache == "cold":
                evict_page_cache(files)
            else:
                _read_all(files)  # warm
            read, read_cpu = _read_all(files)
            if cache == "cold":
                evict_page_cache(files)
            else:
                _read_all(files)
            rec = _reconstruct(tmp / "store", args.threads)
            rows.append({"rep": rep, "cache": cache, "read_s": read, "read_cpu_s": read_cpu, **rec})
            print(
                f"{cache}: read {read:.2f} s ({size / read / 1e9:.2f} GB/s), reconstruct_many "
                f"{rec['seconds']:.2f} s ({size / rec['seconds'] / 1e9:.2f} GB/s), "
                f"x{rec['seconds'] / read:.2f}, +{rec['extra_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
    result["reads"] = rows
    fp32_model = 4 * n
    snapshot = size // args.snapshots
    result["memory_budget_bytes"] = (len(TARGETS) + 1) * fp32_model + snapshot
    result["load"].append(os.getloadavg())
    if args.precision:
        import posthoc_precision

        result["precision"] = posthoc_precision.run(quick=args.quick)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10M parameters, 10 snapshots")
    parser.add_argument("--params", type=float, default=None, help="model size (default 100e6)")
    parser.add_argument("--snapshots", type=int, default=None, help="default 40")
    parser.add_argument("--every", type=int, default=4, help="optimizer steps per snapshot (>= 3)")
    parser.add_argument("--repeats", type=int, default=None, help="cold+hot rounds (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 cores, shared)")
    parser.add_argument("--no-precision", dest="precision", action="store_false")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.threads)
        sys.exit(0)
    args.params = args.params or (10e6 if args.quick else 100e6)
    args.snapshots = args.snapshots or (10 if args.quick else 40)
    args.repeats = args.repeats or (1 if args.quick else 2)
    import posthoc_report

    posthoc_report.write(run(args))
