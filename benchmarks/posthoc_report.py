"""Summary, tables, plot and result files of ``benchmarks/posthoc.py`` (which imports this
module; this one imports nothing of it)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _stem(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    cpu = re.sub(
        r"[^a-z0-9]+", "-", re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", m["cpu"]).lower()
    )
    quick = "_quick" if result["config"]["quick"] else ""
    cpu = cpu.strip("-")
    return f"{m['date'][:10]}_posthoc_{cpu}_{m['cores']}c_torch-{v['torch']}_py{m['python']}{quick}"


def summarise(result: dict) -> dict:
    """Medians per cache state: times, GB/s, ratio to reading, memory against the budget."""
    size = result["store"]["bytes"]
    out = {}
    for cache in ("cold", "hot"):
        rows = [r for r in result["reads"] if r["cache"] == cache]
        read = statistics.median(r["read_s"] for r in rows)
        rec = statistics.median(r["seconds"] for r in rows)
        out[cache] = {
            "read_s": read,
            "read_gb_s": size / read / 1e9,
            "reconstruct_s": rec,
            "reconstruct_gb_s": size / rec / 1e9,
            "ratio": statistics.median(r["seconds"] / r["read_s"] for r in rows),
            "read_cpu_s": statistics.median(r["read_cpu_s"] for r in rows),
            "reconstruct_cpu_s": statistics.median(r["cpu_s"] for r in rows),
            "extra_bytes": max(r["extra_bytes"] for r in rows),
        }
    return out


def markdown(result: dict, summary: dict) -> str:
    m, c, u = result["machine"], result["config"], result["updates"]
    gb = result["store"]["bytes"] / 1e9
    lines = [
        f"# Post-hoc EMA benchmark, {m['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (load average before "
        f"{result['load'][0][0]:.2f}, after {result['load'][-1][0]:.2f}: other jobs shared the "
        "cores when it is well above the benchmark's own ~1), "
        f"{c['threads']} torch thread(s), Python {m['python']}; "
        + ", ".join(f"{k} {x}" for k, x in result["versions"].items()),
        "",
        f"Command: `python benchmarks/posthoc.py{' --quick' if c['quick'] else ''}`. Model: "
        f"{c['params'] / 1e6:.1f}M parameters (GPT-2-like shapes); `PostHocEMA` with sigma_rel "
        f"0.05 and 0.10, float16 snapshots, one every {c['every']} steps: "
        f"{result['store']['files']} files, {gb:.2f} GB. `reconstruct_many` of {len(c['targets'])} "
        f"targets (sigma_rel {', '.join(map(str, c['targets']))}) in a child process; medians of "
        f"{c['repeats']} rounds.",
        "",
        "## Reconstruction vs reading every snapshot file once",
        "",
        "| page cache | read all files | reconstruct_many | ratio (goal <= 1.5) | CPU-seconds "
        "(read / reconstruct) | extra memory | budget |",
        "|---|---|---|---|---|---|---|",
    ]
    budget = result["memory_budget_bytes"] / 2**30
    for cache, s in summary.items():
        read = f"{s['read_s']:.2f} s ({s['read_gb_s']:.2f} GB/s)"
        rec = f"{s['reconstruct_s']:.2f} s ({s['reconstruct_gb_s']:.2f} GB/s)"
        extra = s["extra_bytes"] / 2**30
        cpu = f"{s['read_cpu_s']:.2f} / {s['reconstruct_cpu_s']:.1f}"
        lines.append(
            f"| {cache} | {read} | {rec} | {s['ratio']:.2f} | {cpu} | {extra:.2f} GiB "
            f"| {budget:.2f} GiB |"
        )
    lines += [
        "",
        "cold: the files evicted from the page cache before each measurement (`posix_fadvise`), "
        "so both read from the disk; hot: both read from memory. Budget: (outputs + 1) x the "
        "float32 model + one snapshot. Extra memory: peak RSS of the child above its RSS before "
        "the call. CPU-seconds: user + system time of the process (both threads of the "
        "reconstruction: one reads and checks each file's checksum, the other converts and "
        "multiplies).",
        "",
        "## Snapshot stall",
        "",
        f"`update()` on a plain step: {u['plain_update_s'] * 1e3:.1f} ms; on a snapshot step "
        f"(the same update plus the copy of both averages to float16 host buffers): "
        f"{u['snapshot_update_s'] * 1e3:.1f} ms, a stall of {u['stall_s'] * 1e3:.1f} ms (both "
        "measured with no write in the background). The files are written by a background "
        f"thread; a plain update while it writes took {u['update_during_write_s'] * 1e3:.1f} ms "
        f"(both compete for the 2 cores), and with a snapshot every {c['every']} steps the "
        f"step before a snapshot still waited {u['wait_for_previous_write_s'] * 1e3:.0f} ms "
        f"for the previous write ({result['store']['bytes'] / c['snapshots'] / 1e6:.0f} MB per "
        "snapshot: write, fsync, checksum).",
    ]
    if "precision" in result:
        lines += _precision(result["precision"])
    return "\n".join(lines) + "\n"


def _precision(p: dict) -> list[str]:
    lines = [
        "",
        "## Reconstruction error vs number of snapshots (synthetic stream)",
        "",
        "max |reconstructed sigma_rel 0.08 - power(0.08) kept directly in float64| / the largest "
        "movement of a weight over 2000 steps (weights ~1, moving ~6); fit = relative L2 "
        "distance of the weight profiles.",
        "",
        "| snapshots | float32 | float16 | bfloat16 | fit |",
        "|---|---|---|---|---|",
    ]
    by = {(r["snapshots"], r["dtype"]): r for r in p["synthetic"]}
    for n in sorted({r["snapshots"] for r in p["synthetic"]}):
        lines.append(
            f"| {n} | {by[n, 'float32']['error']:.1e} | {by[n, 'float16']['error']:.1e} | "
            f"{by[n, 'bfloat16']['error']:.1e} | {by[n, 'float32']['fit']:.1e} |"
        )
    lines += [
        "",
        f"## Low-precision snapshots on real training (digits MLP, {p['epochs']} epochs)",
        "",
        "Against the float32 reconstruction from the same run: weight error / largest weight, "
        "change of validation NLL, share of validation predictions that change.",
        "",
        "| sigma_rel | dtype | weight error | NLL (float32) | NLL change | predictions changed |",
        "|---|---|---|---|---|---|",
    ]
    for r in p["training"]:
        lines.append(
            f"| {r['sigma_rel']} | {r['dtype']} | {r['weight_error']:.1e} | {r['nll_float32']:.4f} "
            f"| {r['nll_change']:+.1e} | {r['predictions_changed']:.2%} |"
        )
    return lines


def readme_table(result: dict) -> str:
    """The README's error-vs-snapshots table (float32 and float16 snapshots)."""
    rows = result["precision"]["synthetic"]
    by = {(r["snapshots"], r["dtype"]): r for r in rows}
    lines = [
        "| snapshots (of each average) | float32 files | float16 files | profile fit |",
        "|---|---|---|---|",
    ]
    for n in sorted({r["snapshots"] for r in rows}):
        lines.append(
            f"| {n} | {by[n, 'float32']['error']:.1e} | {by[n, 'float16']['error']:.1e} "
            f"| {by[n, 'float32']['fit']:.1e} |"
        )
    return "\n".join(lines)


def plot(result: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "precision" in result else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    caches = list(summary)
    x = range(len(caches))
    axes[0].bar(
        [i - 0.2 for i in x],
        [summary[c]["read_gb_s"] for c in caches],
        0.4,
        label="read every file once",
    )
    axes[0].bar(
        [i + 0.2 for i in x],
        [summary[c]["reconstruct_gb_s"] for c in caches],
        0.4,
        label=f"reconstruct_many ({len(result['config']['targets'])} targets)",
    )
    axes[0].set(
        xticks=list(x),
        xticklabels=[f"{c} page cache" for c in caches],
        ylabel="GB/s of snapshot files",
        title="Reading the store",
    )
    axes[0].legend(loc="upper left")
    u = result["updates"]
    axes[1].bar(
        ["plain step", "snapshot step"], [u["plain_update_s"] * 1e3, u["snapshot_update_s"] * 1e3]
    )
    axes[1].set(
        ylabel="update() time, ms",
        title=f"update() of a {result['config']['params'] / 1e6:.1f}M-parameter model",
    )
    if panels == 3:
        rows = result["precision"]["synthetic"]
        for dtype in ("float32", "float16", "bfloat16"):
            pts = sorted((r["snapshots"], r["error"]) for r in rows if r["dtype"] == dtype)
            axes[2].plot(*zip(*pts), "o-", label=f"{dtype} snapshots")
        ns = sorted({r["snapshots"] for r in rows})
        axes[2].set_xscale("log")
        axes[2].set_xticks(ns, [str(n) for n in ns])
        axes[2].minorticks_off()
        axes[2].set(
            yscale="log",
            xlabel="snapshots (of each of 2 averages)",
            ylabel="max error / weight movement",
            title="Reconstruction error, sigma_rel 0.08",
        )
        axes[2].legend(loc="lower left")
    fig.suptitle(f"polyak post-hoc EMA ({result['machine']['cpu']}, 2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(result: dict) -> None:
    summary = summarise(result)
    result["summary"] = summary
    RESULTS.mkdir(exist_ok=True)
    stem = _stem(result)
    text = markdown(result, summary)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(text)
    plot(result, summary, RESULTS / f"{stem}.png")
    print(text)
    print(f"results written to {RESULTS / stem}.{{json,md,png}}")


if __name__ == "__main__":  # re-render the Markdown and the plot of a result file
    import sys

    write(json.loads(Path(sys.argv[1]).read_text()))
