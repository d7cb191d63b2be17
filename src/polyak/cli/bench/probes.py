"""The side measurements of ``polyak bench``: Python overhead per update (on the benchmark's
shapes, and swept over the tensor count), compile time of ``compile_update=True`` in fresh
processes, and bf16 storage against float64."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from polyak import EMA
from polyak.cli.bench.config import SWEEP_TENSORS
from polyak.cli.bench.models import build_model, one_element_tensors

__all__ = ["overhead_sweep", "python_overhead", "run_compile_probe", "run_precision"]


def bare_kernels(ema: EMA, decay: float) -> Callable[[], None]:
    """The bare kernels of ``ema``'s one-average update: ``torch._foreach_lerp_`` over each list
    pair of :meth:`polyak.EMA.update_lists` (what the update computes where the dtypes agree),
    ``torch._foreach_copy_`` over the copied ones."""
    w = 1.0 - decay
    lists = ema._update_lists()

    @torch.no_grad()
    def run() -> None:
        for avgs, sources in lists.averaged:
            torch._foreach_lerp_(avgs, sources, w)
        for dsts, sources in lists.copied:
            torch._foreach_copy_(dsts, sources)

    return run


def flattened(ema: EMA) -> bool:
    """Every update group of ``ema`` reads one span: ``flat_params=True`` moved the whole model."""
    return all(len(sources) == 1 for _, sources in ema._update_lists().averaged)


def _overhead_s(ema: EMA, decay: float, pairs: int = 600) -> tuple[float, float]:
    """Median over ``pairs`` back-to-back pairs of (one update - the same bare kernels), the
    order alternating within the pairs: a slow spell of a shared machine hits both sides of a
    pair, and neither side always runs on caches the other warmed. Also the median time of the
    bare kernels alone."""
    kernels, update, clock = bare_kernels(ema, decay), ema.update, time.perf_counter
    for _ in range(20):  # warm up: first-call work is not Python overhead
        update()
        kernels()
    diffs, bare = [], []
    for i in range(pairs):
        first, second = (update, kernels) if i % 2 else (kernels, update)
        t0 = clock()
        first()
        t1 = clock()
        second()
        t2 = clock()
        t_update, t_kernels = (t1 - t0, t2 - t1) if i % 2 else (t2 - t1, t1 - t0)
        diffs.append(t_update - t_kernels)
        bare.append(t_kernels)
    return statistics.median(diffs), statistics.median(bare)


def python_overhead(shape: str, config: Any) -> dict[str, float]:
    """Seconds an ``update()`` spends outside its kernels, for the default and the flat mode:
    a warm loop on ``shape`` at 1% of its width (the same tensors, so the same Python work),
    ``update()`` minus the bare kernels of :func:`bare_kernels`, paired call by call.

    At full size the kernels take milliseconds and vary by +-30% per call on a shared machine,
    so this is how the few-percent goals are checked: kernel time + this overhead."""
    out: dict[str, float] = {}
    for mode, flat in (("default", False), ("flat_params", True)):
        model = build_model(shape, 0.01, config.seed)
        ema = EMA(model, config.decay, flat_params=flat)
        if flat and not flattened(ema):
            raise RuntimeError(f"flat_params=True did not flatten the 1% {shape} model")
        out[mode] = _overhead_s(ema, config.decay)[0]
    return out


def overhead_sweep(config: Any) -> dict[str, Any]:
    """Seconds of Python per ``update()`` against the number of tensors.

    Models of :data:`~polyak.cli.bench.config.SWEEP_TENSORS` one-element float32 parameters, so the
    kernels move next to no memory; for each, ``update()`` minus the same
    ``torch._foreach_lerp_`` over its :meth:`polyak.EMA.update_lists` lists (the median over 600
    back-to-back pairs, see :func:`_overhead_s`), for the default and the ``flat_params=True``
    mode. Also the bare kernels' own time (default mode, median per call), for scale.
    """
    rows = []
    print(f"[sweep] Python overhead per update at {list(SWEEP_TENSORS)} tensors", flush=True)
    for count in SWEEP_TENSORS:
        row: dict[str, Any] = {"tensors": count}
        for mode, flat in (("default", False), ("flat_params", True)):
            ema = EMA(one_element_tensors(count, config.seed), config.decay, flat_params=flat)
            row[f"{mode}_s"], kernels_s = _overhead_s(ema, config.decay)
            if not flat:
                row["kernels_s"] = kernels_s
        rows.append(row)
    return {"what": "update() minus the bare foreach_lerp_ over update_lists()", "rows": rows}


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
        "from polyak.cli.bench.models import build_model\n"
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
    """bf16 storage against float64 over a long drifting, noisy stream.

    A bf16 average rounds away every update ``(1 - decay) * (live - avg)`` smaller than half a
    unit in its last place (2**-9 to 2**-8 of its magnitude): at decay 0.999 it follows only
    weights that differ from it by more than 2-4x its magnitude. Stochastic rounding keeps the
    expected update (Gupta et al., "Deep Learning with
    Limited Numerical Precision", ICML 2015)."""
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
