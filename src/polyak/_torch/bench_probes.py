"""The side measurements of ``polyak bench``: Python overhead per update, compile time of
``compile_update=True`` in fresh processes, and bf16 storage against float64."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from polyak._torch.bench_models import build_model
from polyak._torch.ema import EMA

__all__ = ["python_overhead", "run_compile_probe", "run_precision"]


def _kernels_of(ema: EMA, decay: float) -> Callable[[], None]:
    """The bare kernels of ``ema``'s one-average update: lerp of each flat run, one
    ``_foreach_lerp_`` per group of scattered tensors, copies of copied tensors."""
    w = 1.0 - decay
    lists = ema.update_lists()

    @torch.no_grad()
    def run() -> None:
        for avgs, sources in lists.averaged:
            torch._foreach_lerp_(avgs, sources, w)
        for dsts, sources in lists.copied:
            torch._foreach_copy_(dsts, sources)

    return run


def python_overhead(shape: str, config: Any) -> dict[str, float]:
    """Microseconds an ``update()`` spends outside its kernels, for the default and the flat
    mode: a warm loop on ``shape`` at 1% of its width (the same tensors, so the same Python
    work), ``update()`` minus the bare kernels of :func:`_kernels_of`, in interleaved chunks.

    At full size the kernels take milliseconds and vary by +-30% per call on a shared machine,
    so this is how the few-percent goals are checked: kernel time + this overhead."""
    out: dict[str, float] = {}
    for mode, flat in (("default", False), ("flat_params", True)):
        model = build_model(shape, 0.01, config.seed)
        ema = EMA(model, config.decay, flat_params=flat)
        kernels = _kernels_of(ema, config.decay)
        if flat:
            lists = ema.update_lists().averaged
            assert all(len(a) == 1 for a, _ in lists), "the 1% model did not flatten"
        diffs = []
        for _ in range(15):
            t0 = time.perf_counter()
            for _ in range(40):
                ema.update()
            t1 = time.perf_counter()
            for _ in range(40):
                kernels()
            t2 = time.perf_counter()
            diffs.append(((t1 - t0) - (t2 - t1)) / 40)
        out[mode] = statistics.median(diffs)
    return out


def run_compile_probe(config: Any) -> dict[str, Any]:
    """Seconds to the end of the first ``compile_update`` update in a fresh process, with an
    empty Inductor cache and again with the cache the first run left (``TORCHINDUCTOR_CACHE_DIR``
    in a temporary directory; the user's cache is not touched)."""
    import os
    import subprocess
    import sys
    import tempfile

    code = (
        "import time, torch, polyak\n"
        "from polyak._torch.bench_models import build_model\n"
        "m = build_model('transformer', 0.05)\n"
        "e = polyak.EMA(m, [0.9, 0.99, 0.999, 0.9999, 0.99999], flat_params=True,"
        " compile_update=True)\n"
        "t = time.perf_counter(); e.update(); print(time.perf_counter() - t)\n"
    )
    out: dict[str, Any] = {"what": "first update of a 5-average flat EMA, fresh process"}
    print("[compile] timing torch.compile of the update kernel in fresh processes", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("empty_cache_s", "warm_cache_s"):
            try:
                done = subprocess.run(
                    [sys.executable, "-c", code],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=True,
                )
                out[label] = float(done.stdout.strip().splitlines()[-1])
            except Exception as e:  # report, never crash
                out[label] = None
                out["error"] = f"{type(e).__name__}: {e}"
                break
    return out


def run_precision(config: Any) -> dict[str, Any]:
    """bf16 storage against float64 over a long drifting, noisy stream (literature.md s.5)."""
    steps = 200 if config.quick else 20000
    n = 4096
    gen = torch.Generator().manual_seed(config.seed)
    sign = torch.randint(0, 2, (n,), generator=gen) * 2.0 - 1.0
    magnitude = sign * 10.0 ** (-3.0 * torch.rand(n, generator=gen))
    out: dict[str, Any] = {"steps": steps, "weights": n, "drift": 0.05, "noise": 0.01, "rows": []}
    print(f"[precision] bf16 storage vs float64, {steps} steps", flush=True)
    for decay in (0.999, 0.9999):
        model = nn.Linear(n, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(magnitude)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variants = {
                "float32": EMA(model, decay),
                "bfloat16, round-to-nearest": EMA(model, decay, dtype=torch.bfloat16),
                "bfloat16, stochastic rounding": EMA(
                    model, decay, dtype=torch.bfloat16, stochastic_rounding=True, seed=1
                ),
            }
            init = {k: e.averaged_tensors()["weight"].double().clone() for k, e in variants.items()}
            ref = magnitude.double().clone()
            for t in range(1, steps + 1):
                live = magnitude * (1 + 0.05 * t / steps)
                live = live + 0.01 * magnitude.abs() * torch.randn(n, generator=gen)
                with torch.no_grad():
                    model.weight.copy_(live)
                for e in variants.values():
                    e.update()
                ref.lerp_(model.weight.detach().double().view(-1), 1 - decay)
        ref0 = magnitude.double()
        for name, e in variants.items():
            got = e.averaged_tensors()["weight"].double().view(-1)
            err = (got - ref).abs()
            out["rows"].append(
                {
                    "decay": decay,
                    "storage": name,
                    "moved": (
                        (got - init[name].view(-1)).abs().sum() / (ref - ref0).abs().sum()
                    ).item(),
                    "median_rel_err": (err / ref.abs()).median().item(),
                    "p99_rel_err": (err / ref.abs()).quantile(0.99).item(),
                    "median_err_of_movement": (err / (ref - ref0).abs().clamp_min(1e-30))
                    .median()
                    .item(),
                }
            )
    return out
