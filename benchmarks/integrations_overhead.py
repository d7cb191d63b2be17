"""What the Lightning and Hugging Face EMA callbacks add per optimizer step over a bare
``ema.update()``: ``python benchmarks/integrations_overhead.py [--rounds N] [--quick]``.

Three candidates share one model (the benchmark's ``transformer`` shape: 399 tensors) and each
keeps its own EMA of it. Each runs ``optimizer.step()`` of its own optimizer (SGD over one
scalar without a gradient: it changes nothing but runs the optimizer's step hooks, where the
callbacks count steps) and then

* bare: ``ema.update()``;
* lightning: Lightning's own dispatch of ``on_train_batch_end`` to ``EMACallback`` (the callback
  counted the step in the optimizer's step post-hook);
* transformers: the ``CallbackHandler``'s dispatch of ``on_step_end`` to ``EMACallback``;
* both again with the callback's hook called directly: the callback's own cost, without what the
  framework spends to call any callback.

Every round runs the three in a shuffled order; the overhead is the median over rounds of the
paired difference (callback - bare), in microseconds of this thread's CPU time (what the
callback costs, whatever else the shared machine runs) and, for reference, of wall time. At
the full width an update takes ~10 ms of kernels and the machine's noise hides a difference of
microseconds, so the same 399 tensors are also measured at 1% width, where the update is
nearly all Python and each timing averages ``--calls`` consecutive steps. Results:
``benchmarks/results/`` (markdown, json, png).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

import polyak
from polyak.cli.bench.models import build_model
from polyak.cli.bench.report import machine as bench_machine

RESULTS = Path(__file__).resolve().parent / "results"
_DISTS = ("polyak", "torch", "lightning", "transformers", "accelerate")


class _Wrapped(nn.Module):
    """The benchmark model as a LightningModule / Trainer model (no forward needed)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _lightning(model: nn.Module, dispatch: bool) -> Any:
    import lightning.pytorch as L
    from lightning.pytorch.trainer import call

    from polyak.integrations.lightning import EMACallback

    module = L.LightningModule()
    module.inner = model
    cb = EMACallback(0.999)
    trainer = L.Trainer(
        callbacks=[cb],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.callbacks = [cb]  # only the callback measured
    trainer.strategy.connect(module)
    optimizer = _optimizer()
    trainer.strategy.optimizers = [optimizer]
    cb.on_train_start(trainer, module)  # builds the EMA, counts the optimizer's steps

    def step() -> None:
        optimizer.step()
        call._call_callback_hooks(trainer, "on_train_batch_end", None, None, 0)

    def direct() -> None:
        optimizer.step()
        cb.on_train_batch_end(trainer, module, None, None, 0)

    return (step if dispatch else direct), cb


def _transformers(model: nn.Module, tmp: str, dispatch: bool) -> Any:
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState
    from transformers.utils import logging as hf_logging

    from polyak.integrations.transformers import EMACallback

    hf_logging.set_verbosity_error()
    cb = EMACallback(0.999)
    args = TrainingArguments(tmp, use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = Trainer(model=_Wrapped(model), args=args, callbacks=[cb])  # cb finds its Trainer
    optimizer = _optimizer()
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control, optimizer=optimizer)
    handler = CallbackHandler([cb], trainer.model, None, optimizer, None)  # only this callback

    def step() -> None:
        optimizer.step()
        handler.on_step_end(args, state, control)

    def direct() -> None:
        optimizer.step()
        cb.on_step_end(args, state, control)

    return (step if dispatch else direct), cb


def _bare(model: nn.Module) -> Any:
    ema = polyak.EMA(model, 0.999)
    optimizer = _optimizer()

    def step() -> None:
        optimizer.step()
        ema.update()

    return step, ema


def measure(scale: float, rounds: int, calls: int, tmp: str) -> dict[str, Any]:
    model = build_model("transformer", scale=scale)
    steps = {
        "bare": _bare(model),
        "lightning": _lightning(model, dispatch=True),
        "transformers": _transformers(model, tmp, dispatch=True),
        "lightning, hook called directly": _lightning(model, dispatch=False),
        "transformers, hook called directly": _transformers(model, tmp, dispatch=False),
    }
    for fn, _ in steps.values():  # warm up
        for _ in range(3):
            fn()
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    wall: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            fn = steps[name][0]
            start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
            for _ in range(calls):
                fn()
            cpu[name].append((time.thread_time_ns() - start_cpu) / calls / 1e3)  # us
            wall[name].append((time.perf_counter_ns() - start) / calls / 1e3)
    counts = {name: getattr(held, "ema", held).step for name, (_, held) in steps.items()}
    assert len(set(counts.values())) == 1, counts  # every candidate updated once per step
    rows: dict[str, dict[str, float]] = {}
    for name in list(steps)[1:]:  # the callbacks, in a fixed order
        rows[name] = {}
        for clock, samples in (("cpu", cpu), ("wall", wall)):
            diffs = [a - b for a, b in zip(samples[name], samples["bare"])]
            q = statistics.quantiles(diffs, n=4)
            rows[name].update(
                {f"{clock}_us": statistics.median(diffs), f"{clock}_q1": q[0], f"{clock}_q3": q[2]}
            )
    tensors = sum(1 for _ in model.parameters())
    return {
        "scale": scale,
        "tensors": tensors,
        "params": sum(p.numel() for p in model.parameters()),
        "rounds": rounds,
        "calls_per_timing": calls,
        "step_cpu_us": {name: statistics.median(s) for name, s in cpu.items()},
        "step_wall_us": {name: statistics.median(s) for name, s in wall.items()},
        "overhead": rows,
        "updates": counts["bare"],
    }


def machine() -> dict[str, Any]:
    """The bench's machine description, the load before the run, and the frameworks' versions."""
    versions = {}
    for name in _DISTS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {**bench_machine(), "load_before": os.getloadavg(), "versions": versions}


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"# EMA callbacks: overhead per optimizer step over a bare `ema.update()`, {m['date']}",
        "",
        "```",
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), "
        f"Python {m['python']}",
        versions,
        "load average (1/5/15 min) before "
        + "/".join(f"{x:.2f}" for x in m["load_before"])
        + ", after "
        + "/".join(f"{x:.2f}" for x in m["load_after"]),
        "```",
        "",
        "The machine was shared with other jobs while this ran (see the load average). "
        "Method: `benchmarks/integrations_overhead.py` (its docstring); overhead = median over "
        "rounds of the paired difference callback - bare in the same round, with the "
        "interquartile range of those differences; CPU time is this thread's, wall time "
        "includes waiting for the shared cores.",
        "",
        "| model | tensors | rounds x calls | callback | bare step us (CPU) | "
        "overhead us, CPU time: median (IQR) | overhead us, wall time: median (IQR) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in result["runs"]:
        shape = f"transformer, {r['params'] / 1e6:.2f}M parameters ({100 * r['scale']:g}% width)"
        for name, o in r["overhead"].items():
            lines.append(
                f"| {shape} | {r['tensors']} | {r['rounds']} x {r['calls_per_timing']} | {name} | "
                f"{r['step_cpu_us']['bare']:.0f} | {o['cpu_us']:.1f} ({o['cpu_q1']:.1f} .. "
                f"{o['cpu_q3']:.1f}) | {o['wall_us']:.1f} ({o['wall_q1']:.1f} .. "
                f"{o['wall_q3']:.1f}) |"
            )
    lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.2), squeeze=False)
    for ax, r in zip(axes[0], runs):
        names = list(r["overhead"])
        med = [r["overhead"][n]["cpu_us"] for n in names]
        low = [m - r["overhead"][n]["cpu_q1"] for n, m in zip(names, med)]
        high = [r["overhead"][n]["cpu_q3"] - m for n, m in zip(names, med)]
        labels = [n.replace(", hook called directly", "\n(hook only)") for n in names]
        colors = ["#4c72b0" if "lightning" in n else "#dd8452" for n in names]
        ax.bar(labels, med, yerr=[low, high], capsize=6, color=colors)
        ax.tick_params(axis="x", labelsize=8)
        ax.axhline(50, color="gray", linestyle="--", label="target: 50 us")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("added CPU time per optimizer step (us)")
        ax.set_title(
            f"transformer shape, {100 * r['scale']:g}% width: {r['tensors']} tensors, "
            f"{r['params'] / 1e6:.2f}M params\n"
            f"(bare optimizer.step() + ema.update(): {r['step_cpu_us']['bare']:.0f} us CPU)",
            fontsize=9,
        )
        low_y, high_y = ax.get_ylim()
        ax.set_ylim(low_y, max(high_y, 50) + 0.25 * (max(high_y, 50) - low_y))  # room for the key
        ax.legend(loc="upper right")
    fig.suptitle(
        "EMA callbacks: CPU time added per optimizer step over a bare ema.update() "
        "(median, IQR of paired differences)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--calls", type=int, default=50, help="steps per timing at 1%% width")
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke test)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a result file")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return 0
    torch.set_num_threads(1)
    rounds = 10 if args.quick else args.rounds
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": machine(), "runs": []}
        result["runs"].append(measure(0.01, rounds, args.calls, tmp))
        result["runs"].append(measure(1.0, max(10, rounds // 4), 1, tmp))
    result["machine"]["load_after"] = os.getloadavg()
    text = report(result)
    print(text)
    m = result["machine"]
    cpu = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", m["cpu"]).lower()
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu)
    v = m["versions"]
    stem = (
        f"{m['date'][:10]}_{cpu.strip('-')}_{m['cores']}c_torch-{v['torch']}_"
        f"lightning-{v['lightning']}_transformers-{v['transformers']}_py{m['python']}_"
        "integrations-overhead" + ("_quick" if args.quick else "")
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(text + f"\n![overhead]({stem}.png)\n")
    plot(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
