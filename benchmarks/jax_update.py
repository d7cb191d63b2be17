"""Benchmark one ``polyak.jax`` update under ``jax.jit`` against optax and the memory floor.

    python benchmarks/jax_update.py [--rounds 30] [--quick] [--output-dir benchmarks/results]

A 20.2M-parameter pytree of 399 leaves (the layout of ``polyak bench``'s transformer: a GPT-like
stack of 33 blocks), float32, and the same in bfloat16. Candidates, each jitted with its average
donated (updated in place, as in a train step):

* ``lerp (flat)``: one fused ``a + w * (x - a)`` over a single flat float32 array of the same
  size: the memory floor (read the weights, read and write the average).
* ``polyak.jax``: ``jax.jit(pj.update, donate_argnums=0)`` with ``decay=0.999``.
* ``polyak.jax, nonfinite=skip`` / ``raise``: the same with the inf/nan gate (one more read of
  the params and a ``lax.cond``; under ``jax.jit`` "raise" gates the same way and records).
* ``optax.incremental_update``: ``jax.jit`` of it with ``step_size=0.001``, average donated.
* the bfloat16 pair: ``pj.update`` on bf16 params (float32 average) and its floor, one lerp
  reading a flat bf16 array into a flat float32 one.

Every candidate runs once per round, rounds in a shuffled order; before each timed call the
caches are flushed (a 512 MiB read). A time is one call until its result is ready (dispatch
included). Ratios are medians of per-round ratios, so a slow spell of the shared machine hits
both sides. The per-call dispatch overhead is measured apart on the same tree at 1% width.
Writes ``<date>_<cpu>_<cores>c_jax-<v>_py<v>.{json,md,png}`` to the output directory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import polyak.jax as pj

DECAY = 0.999
GOAL = 1.10  # polyak.jax / flat lerp


def transformer(width: int = 208, depth: int = 33) -> dict[str, Any]:
    """Shapes of ``polyak bench``'s transformer (embeddings, 33 blocks, final LayerNorm)."""
    d = width
    block = {
        "ln1": {"scale": (d,), "bias": (d,)},
        "qkv": {"kernel": (d, 3 * d), "bias": (3 * d,)},
        "proj": {"kernel": (d, d), "bias": (d,)},
        "ln2": {"scale": (d,), "bias": (d,)},
        "fc1": {"kernel": (d, 4 * d), "bias": (4 * d,)},
        "fc2": {"kernel": (4 * d, d), "bias": (d,)},
    }
    vocab, context = 13500 * width // 208, 1024 * width // 208
    return {
        "wte": (vocab, d),
        "wpe": (context, d),
        "blocks": [block] * depth,
        "ln_f": {"scale": (d,)},
    }


def build(shapes: Any, dtype: Any, key: jax.Array) -> Any:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)]
    )


class Candidate:
    """A jitted update and the state it carries from call to call (donated each time)."""

    def __init__(self, name: str, fn: Callable[..., Any], state: Any, *args: Any) -> None:
        self.name, self.fn, self.state, self.args = name, fn, state, args

    def __call__(self) -> None:
        self.state = self.fn(self.state, *self.args)
        jax.block_until_ready(self.state)


def _jit(update: Callable[..., Any], inner: int) -> Callable[..., Any]:
    """``update`` jitted with its state donated; ``inner > 1``: that many updates in one call
    (a ``lax.fori_loop``), which spreads the call's dispatch as a jitted train step does. The
    weights are multiplied by a factor that depends on the iteration, which fuses into the
    update (no extra traffic) and keeps XLA from hoisting work on them out of the loop: in a
    train step they change every step."""
    if inner == 1:
        return jax.jit(update, donate_argnums=0)

    def body(i: jax.Array, state: Any, args: tuple[Any, ...]) -> Any:
        scale = 1.0 + i * 1e-9
        return update(state, *jax.tree.map(lambda x: x * scale.astype(x.dtype), args))

    def looped(state: Any, *args: Any) -> Any:
        return jax.lax.fori_loop(0, inner, lambda i, s: body(i, s, args), state)

    return jax.jit(looped, donate_argnums=0)


def _lerp(avg: jax.Array, x: jax.Array, weight: jax.Array) -> jax.Array:
    return avg + weight * (x.astype(avg.dtype) - avg)


def _incremental(old: Any, new: Any) -> Any:
    return optax.incremental_update(new, old, 1.0 - DECAY)


def candidates(width: int, seed: int, inner: int = 1) -> tuple[list[Candidate], int, int]:
    shapes = transformer(width)
    key = jax.random.key(seed)
    f32 = build(shapes, jnp.float32, key)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32)
    n = sum(x.size for x in jax.tree.leaves(f32))
    flat = jax.random.normal(key, (n,), jnp.float32)
    flat_bf16 = flat.astype(jnp.bfloat16)
    weight = jnp.float32(1.0 - DECAY)
    lerp, update, incremental = (_jit(f, inner) for f in (_lerp, pj.update, _incremental))
    out = [
        Candidate("lerp (flat)", lerp, jnp.zeros(n, jnp.float32), flat, weight),
        Candidate("polyak.jax", update, pj.init(f32, DECAY), f32),
        Candidate("polyak.jax, nonfinite=skip", update, pj.init(f32, DECAY, nonfinite="skip"), f32),
        Candidate(
            "polyak.jax, nonfinite=raise", update, pj.init(f32, DECAY, nonfinite="raise"), f32
        ),
        Candidate("optax.incremental_update", incremental, jax.tree.map(jnp.copy, f32), f32),
        Candidate("lerp (flat, bf16 weights)", lerp, jnp.zeros(n, jnp.float32), flat_bf16, weight),
        Candidate("polyak.jax, bf16 params", update, pj.init(bf16, DECAY), bf16),
    ]
    return out, n, len(jax.tree.leaves(f32))


def time_rounds(cands: list[Candidate], rounds: int, flush: Callable[[], None], seed: int) -> Any:
    rng = random.Random(seed)
    times: dict[str, list[float]] = {c.name: [] for c in cands}
    for c in cands:  # compile and warm up
        for _ in range(3):
            c()
    for _ in range(rounds):
        order = list(cands)
        rng.shuffle(order)
        for c in order:
            flush()
            t0 = time.perf_counter()
            c()
            times[c.name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def ratio_iqr(times: dict[str, list[float]], a: str, b: str) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles([x / y for x, y in zip(times[a], times[b])], n=4)
    return q1, q3


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_before": os.getloadavg(),
    }


def versions() -> dict[str, str]:
    return {n: metadata.version(n) for n in ("polyak", "jax", "jaxlib", "optax", "numpy")}


INNER = 10  # updates per call in the second section

RATIOS = {
    "polyak.jax / lerp (flat)": ("polyak.jax", "lerp (flat)"),
    "optax.incremental_update / lerp (flat)": ("optax.incremental_update", "lerp (flat)"),
    "polyak.jax / optax.incremental_update": ("polyak.jax", "optax.incremental_update"),
    "nonfinite=skip / propagate": ("polyak.jax, nonfinite=skip", "polyak.jax"),
    "nonfinite=raise / propagate": ("polyak.jax, nonfinite=raise", "polyak.jax"),
    "polyak.jax bf16 / its flat lerp": ("polyak.jax, bf16 params", "lerp (flat, bf16 weights)"),
    "polyak.jax bf16 / polyak.jax f32": ("polyak.jax, bf16 params", "polyak.jax"),
}


def section(inner: int, rounds: int, width: int, seed: int, flush: Callable[[], None]) -> Any:
    """Time every candidate doing ``inner`` updates per jitted call; times are per update."""
    cands, n, leaves = candidates(width, seed, inner)
    times = {k: [x / inner for x in v] for k, v in time_rounds(cands, rounds, flush, seed).items()}
    dispatch = None
    if inner == 1:  # the same tree at 1% width: what a call costs beyond its memory traffic
        small, _, _ = candidates(max(2, width // 100), seed)
        dispatch = time_rounds(small, rounds, lambda: None, seed)
    rows = []
    for c in cands:
        q1, _, q3 = statistics.quantiles(times[c.name], n=4)
        med = statistics.median(times[c.name])
        bf16 = "bf16" in c.name
        floor = "lerp (flat, bf16 weights)" if bf16 else "lerp (flat)"
        rows.append(
            {
                "name": c.name,
                "median_s": med,
                "iqr_s": q3 - q1,
                # minimal traffic: read the weights, read and write the float32 average
                "gb_s": (10 if bf16 else 12) * n / med / 1e9,
                "x_floor": ratio(times, c.name, floor),
                "x_floor_iqr": ratio_iqr(times, c.name, floor),
                "floor": floor,
                "dispatch_s": None if dispatch is None else statistics.median(dispatch[c.name]),
                "samples_s": times[c.name],
            }
        )
    ratios = {k: ratio(times, a, b) for k, (a, b) in RATIOS.items()}
    return {"updates_per_call": inner, "rows": rows, "ratios": ratios}, n, leaves


def run(rounds: int, width: int, seed: int) -> dict[str, Any]:
    flush_buf = np.ones(512 * 2**20 // 8)

    def flush() -> None:
        float(flush_buf.sum())

    result: dict[str, Any] = {"machine": machine(), "versions": versions()}
    print(f"timing one update per call, then {INNER} per call; {rounds} rounds", flush=True)
    sections = [section(k, rounds, width, seed, flush) for k in (1, INNER)]
    n, leaves = sections[0][1], sections[0][2]
    result["machine"]["load_after"] = os.getloadavg()
    result |= {"params": n, "leaves": leaves, "rounds": rounds, "width": width}
    result["sections"] = [s for s, _, _ in sections]
    value = result["sections"][0]["ratios"]["polyak.jax / lerp (flat)"]
    result["goal"] = {
        "target": f"<= {GOAL:.2f}x lerp (flat), one update per call",
        "value": value,
        "met": value <= GOAL,
        "in_train_step": result["sections"][1]["ratios"]["polyak.jax / lerp (flat)"],
    }
    return result


def _stem(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    cpu = re.sub(
        r"[^a-z0-9]+", "-", re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", m["cpu"]).lower()
    )
    quick = "_quick" if result["width"] != 208 else ""
    return f"{m['date'][:10]}_{cpu.strip('-')}_{m['cores']}c_jax-{v['jax']}_py{m['python']}{quick}"


def markdown(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    load = "/".join(f"{x:.2f}" for x in m["load_before"])
    load_after = "/".join(f"{x:.2f}" for x in m["load_after"])
    lines = [
        f"# polyak.jax update benchmark, {m['date']}",
        "",
        "```",
        f"{m['cpu']}, {m['cores']} cores, devices {m['devices']}, Python {m['python']}",
        ", ".join(f"{k} {x}" for k, x in v.items()),
        f"load average (1/5/15 min) before {load}, after {load_after}",
        f"$ {result['command']}",
        "```",
        "",
        f"{result['params'] / 1e6:.1f}M parameters in {result['leaves']} leaves (a GPT-like "
        f"layout), decay {DECAY}, {result['rounds']} interleaved rounds in a shuffled order, "
        "caches flushed (a 512 MiB read) before each call, every state donated (updated in "
        "place). When other jobs share the machine (a load average well above 1) absolute "
        "times vary, the paired per-round ratios much less. `x floor`: median (and quartiles) "
        "of per-round ratios to one fused lerp over a flat array of the same size and weights' "
        "dtype (the memory floor). GB/s: minimal traffic (read the weights, read and write the "
        "float32 average) / median time.",
        "",
    ]
    for sec in result["sections"]:
        k = sec["updates_per_call"]
        if k == 1:
            lines += [
                "## One update per jitted call",
                "",
                "Time per call, until the result is ready. `call at 1% width`: the same tree "
                "with 1% of the elements, i.e. the cost of a call beyond its memory traffic "
                "(flattening and passing every leaf, launching one kernel per leaf).",
            ]
        else:
            lines += [
                f"## {k} updates per jitted call",
                "",
                f"A `lax.fori_loop` of {k} updates in one call, time / {k}: the call's overhead "
                "is spread as inside a jitted train step, where the update is one more part of "
                "the step's computation. Each iteration scales the weights by `1 + i * 1e-9` "
                "(fused into the update: no extra traffic), as a train step changes them. "
                "`nonfinite=skip`/`raise` read the scaled weights twice (the finiteness sums, "
                "then the update), so XLA writes them out once: a write and a read that a train "
                "step, whose new weights are in memory anyway, does not pay; for them the "
                "one-update-per-call ratio is the closer model.",
            ]
        head = "| candidate | median ms | IQR ms | GB/s | x floor | x floor IQR |"
        rule = "|---|---:|---:|---:|---:|---:|"
        if k == 1:
            head, rule = head + " call at 1% width, us |", rule + "---:|"
        lines += ["", head, rule]
        for r in sec["rows"]:
            row = (
                f"| {r['name']} | {r['median_s'] * 1e3:.2f} | {r['iqr_s'] * 1e3:.2f} | "
                f"{r['gb_s']:.1f} | {r['x_floor']:.3f} | "
                f"{r['x_floor_iqr'][0]:.2f}-{r['x_floor_iqr'][1]:.2f} |"
            )
            lines.append(row + (f" {r['dispatch_s'] * 1e6:.0f} |" if k == 1 else ""))
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {name} | {x:.3f} |" for name, x in sec["ratios"].items()]
        lines.append("")
    g = result["goal"]
    lines += [
        f"Goal: polyak.jax {g['target']}: {g['value']:.3f}x, "
        f"{'met' if g['met'] else 'missed'}; with {INNER} updates per call "
        f"{g['in_train_step']:.3f}x.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, sec in zip(axes, result["sections"]):
        rows = sec["rows"][::-1]
        names = [r["name"] for r in rows]
        ms = [r["median_s"] * 1e3 for r in rows]
        colors = ["tab:gray" if n.startswith("lerp") else "tab:blue" for n in names]
        ax.barh(names, ms, color=colors)
        for y, r in enumerate(rows):
            ax.text(r["median_s"] * 1e3, y, f" {r['x_floor']:.2f}x floor", va="center", fontsize=8)
        ax.set_xlim(0, max(ms) * 1.35)
        ax.set_xlabel("median time per update (ms)")
        k = sec["updates_per_call"]
        ax.set_title("one update per call" if k == 1 else f"{k} updates per call", fontsize=9)
    m = result["machine"]
    fig.suptitle(
        f"EMA update of {result['params'] / 1e6:.1f}M params in {result['leaves']} leaves under "
        f"jax.jit; {m['cpu']}, {m['cores']} cores, jax {result['versions']['jax']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a 10x narrower tree, 5 rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error("--rounds must be >= 5")
    width, rounds = (20, 5) if args.quick else (208, args.rounds)
    result = run(rounds, width, args.seed)
    result["command"] = " ".join(["python", "benchmarks/jax_update.py", *sys.argv[1:]])
    os.makedirs(args.output_dir, exist_ok=True)
    base = os.path.join(args.output_dir, _stem(result))
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(base + ".md", "w") as f:
        f.write(text)
    plot(result, base + ".png")
    print(text)
    print(f"wrote {base}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
