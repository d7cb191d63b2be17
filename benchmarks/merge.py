"""``polyak.merge`` at scale: merging checkpoints against reading them once, its memory, mergekit.

    python benchmarks/merge.py                    # 8 checkpoints of a 29M-parameter Llama
    python benchmarks/merge.py --quick            # a smoke run (3M parameters)
    python benchmarks/merge.py --mergekit-python /path/venv/bin/python   # mergekit's venv

1. Checkpoints: a Llama (``LlamaForCausalLM`` shapes, built from a config: 29M parameters,
   float32, largest tensor the 24000 x 384 embedding) saved in the Hugging Face layout
   (``checkpoint-N/model.safetensors``, ``config.json``, ``trainer_state.json``), 16 of them
   with different random weights.
2. Time: every input file read once (16 MiB ``readinto``, front to back) against
   ``polyak.merge.merge`` of the same 8 checkpoints (uniform weights, written to disk), and
   mergekit's ``linear`` merge of them (``mergekit-yaml``, ``--lazy-unpickle``, float32), in
   rounds, each measurement in its own process: "warm" (the inputs in the page cache) and
   "cold" (each input fsynced and dropped with ``posix_fadvise(DONTNEED)`` first: what a
   process can drop).
3. Memory: each command's peak RSS (``ru_maxrss``, imports included), and for polyak the peak
   during the merge call above the RSS before it (``VmHWM`` after resetting it through
   ``/proc/self/clear_refs``), at 4, 8 and 16 checkpoints: it must not grow with their number;
   goal <= 3 largest tensors + 200 MB.
4. Agreement: polyak's output against mergekit's and against a float64 sum of the inputs.

mergekit pins its own transformers: it runs from its own venv (``--mergekit-python``; made with
``python3 -m venv V && V/bin/pip install torch==2.13.0 mergekit==0.1.5``); without one the
benchmark runs a load-everything script in its place (``torch.load``/``load_file`` of every
checkpoint, then the sum). The checkpoints go to ``--work`` (default ``.bench-tmp/merge``,
git-ignored) and are deleted at the end; the result goes to ``benchmarks/results/``
(:func:`polyak.cli.common.write_result`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# Runs a command, then prints its wall time and the largest RSS of its processes (the children
# are only the command: RUSAGE_CHILDREN of this wrapper is theirs).
WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - start
if done.returncode:
    sys.exit(done.stdout[-2000:] + done.stderr[-4000:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024,
                  "child": done.stdout.strip().splitlines()[-1:] }))
"""

POLYAK = """
import json, sys, time
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
import torch
torch.set_num_threads(1)
import polyak.merge as pm
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # forget the imports' peak: VmHWM restarts from VmRSS
base = status("VmRSS")
paths = json.loads(sys.argv[1])
start = time.perf_counter()
pm.merge(paths, [1.0] * len(paths), sys.argv[2])
seconds = time.perf_counter() - start
print(json.dumps({"base_mb": base, "merge_peak_mb": status("VmHWM"), "inner_seconds": seconds}))
"""

READ = """
import json, sys, time
buf = bytearray(16 << 20)
start = time.perf_counter()
for f in json.loads(sys.argv[1]):
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
print(json.dumps({"inner_seconds": time.perf_counter() - start}))
"""

LOAD_ALL = """
import json, sys, time
import torch
from safetensors.torch import load_file, save_file
paths = json.loads(sys.argv[1])
start = time.perf_counter()
states = [load_file(p + "/model.safetensors") for p in paths]
out = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
save_file(out, sys.argv[2] + "/model.safetensors")
print(json.dumps({"inner_seconds": time.perf_counter() - start}))
"""


def _shapes(quick: bool) -> tuple[dict[str, list[int]], dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (4000, 128, 384, 4) if quick else (24000, 384, 1024, 6)
    vocab, hidden, inter, layers = size
    heads = 4 if quick else 6
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
    )
    import torch

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return shapes, {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}


def make_checkpoints(work: Path, n: int, quick: bool) -> tuple[list[Path], dict[str, Any]]:
    import torch
    from safetensors.torch import save_file

    shapes, config = _shapes(quick)
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(1, n + 1):
        folder = work / f"checkpoint-{100 * i}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100 * i}))
        paths.append(folder)
    numel = sum(int(torch.Size(s).numel()) for s in shapes.values())
    largest = max(int(torch.Size(s).numel()) for s in shapes.values()) * 4
    return paths, {"parameters": numel, "largest_tensor_bytes": largest, "tensors": len(shapes)}


def _measure(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True,
                          text=True, env=env)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{argv[:3]} failed: {done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    child = out.pop("child")
    if child:
        out.update(json.loads(child[0]))
    return out


class Runner:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}

    def fresh(self, name: str) -> Path:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out

    def read(self, files: list[Path]) -> dict[str, Any]:
        return _measure([sys.executable, "-c", READ, json.dumps([str(f) for f in files])])

    def polyak(self, paths: list[Path]) -> dict[str, Any]:
        out = self.fresh("out-polyak")
        argv = [sys.executable, "-c", POLYAK, json.dumps([str(p) for p in paths]), str(out)]
        return _measure(argv, self.env)

    def peer(self, paths: list[Path]) -> dict[str, Any]:
        out = self.fresh("out-peer")
        if self.args.mergekit_python is None:
            argv = [sys.executable, "-c", LOAD_ALL, json.dumps([str(p) for p in paths]), str(out)]
            return _measure(argv, self.env)
        config = self.work / "mergekit.yml"
        lines = ["merge_method: linear", "dtype: float32", "models:"]
        for p in paths:
            lines += [f"  - model: {p}", "    parameters:", f"      weight: {1 / len(paths)}"]
        config.write_text("\n".join(lines) + "\n")
        tool = Path(self.args.mergekit_python).parent / "mergekit-yaml"
        argv = [str(tool), str(config), str(out), "--lazy-unpickle", "--quiet", "-j", "1"]
        return _measure(argv, {**os.environ, "OMP_NUM_THREADS": "1"})


def _agreement(work: Path, paths: list[Path], peer: bool) -> dict[str, float]:
    import torch
    from safetensors.torch import load_file

    ours = load_file(work / "out-polyak" / "model.safetensors")
    ref_err, peer_err = 0.0, 0.0
    states = [load_file(p / "model.safetensors") for p in paths]
    for k, v in ours.items():
        ref = sum(s[k].double() for s in states) / len(states)
        ref_err = max(ref_err, float((v.double() - ref).abs().max() / ref.abs().max()))
    if peer:
        theirs = {}
        for f in sorted((work / "out-peer").glob("*.safetensors")):
            theirs.update(load_file(f))
        assert set(theirs) >= set(ours), sorted(set(ours) - set(theirs))[:3]
        peer_err = max(float((theirs[k].float() - v).abs().max()) for k, v in ours.items())
    del torch
    return {"polyak_vs_float64_rel": ref_err, "polyak_vs_peer_max_abs": peer_err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3M parameters, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--mergekit-python",
        default=None,
        help="python of a venv with mergekit (else a load-everything script)",
    )
    parser.add_argument("--work", default=str(ROOT / ".bench-tmp" / "merge"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    from polyak.cli.common import (
        evict_page_cache,
        load,
        machine,
        result_stem,
        versions,
        write_result,
    )

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    load_before = load()
    paths, model = make_checkpoints(work / "ckpt", 16, args.quick)
    runner = Runner(args, work)
    files8 = [p / "model.safetensors" for p in paths[:8]]
    rounds = 1 if args.quick else args.rounds
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {"warm": {}, "cold": {}}
    for _ in range(rounds):
        for cache in ("warm", "cold"):
            for what in ("read", "polyak", "peer"):
                if cache == "cold":
                    evict_page_cache(files8)
                else:
                    runner.read(files8)  # warm the cache
                result = runner.read(files8) if what == "read" else getattr(runner, what)(
                    paths[:8])  # fmt: skip
                rows[cache].setdefault(what, []).append(result)
                print(cache, what, json.dumps(result), flush=True)
    agreement = _agreement(work, paths[:8], True)
    flat = {}
    for n in (4, 8, 16):
        runner.read([p / "model.safetensors" for p in paths[:n]])
        flat[n] = [runner.polyak(paths[:n]) for _ in range(1 if args.quick else 2)]
        print("flat", n, json.dumps(flat[n]), flush=True)
    shutil.rmtree(work, ignore_errors=True)

    def med(cache: str, what: str, key: str = "seconds") -> float:
        return statistics.median(r[key] for r in rows[cache][what])

    peer_name = "mergekit linear" if args.mergekit_python else "load everything, then sum"
    summary = {
        cache: {
            "read_s": med(cache, "read", "inner_seconds"),
            "polyak_s": med(cache, "polyak", "inner_seconds"),
            "polyak_process_s": med(cache, "polyak"),
            "peer_process_s": med(cache, "peer"),
            "ratio": med(cache, "polyak", "inner_seconds") / med(cache, "read", "inner_seconds"),
            "polyak_peak_mb": max(r["peak_mb"] for r in rows[cache]["polyak"]),
            "polyak_merge_extra_mb": max(
                r["merge_peak_mb"] - r["base_mb"] for r in rows[cache]["polyak"]
            ),
            "peer_peak_mb": max(r["peak_mb"] for r in rows[cache]["peer"]),
        }
        for cache in rows
    }
    budget_mb = 3 * model["largest_tensor_bytes"] / 2**20 + 200
    flat_rows = {
        n: {"peak_mb": max(r["peak_mb"] for r in rs),
            "extra_mb": max(r["merge_peak_mb"] - r["base_mb"] for r in rs),
            "seconds": statistics.median(r["inner_seconds"] for r in rs)}
        for n, rs in flat.items()
    }  # fmt: skip
    peer_versions = {}
    if args.mergekit_python:
        code = "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"
        got = subprocess.run([args.mergekit_python, "-c", code], capture_output=True, text=True)
        peer_versions = dict(zip(("mergekit", "torch"), got.stdout.split()))
    m = machine()
    m["load_before"] = load_before
    v = versions(("polyak", "torch", "numpy", "safetensors", "transformers"))
    result = {
        "machine": m,
        "versions": v,
        "peer": {"name": peer_name, **peer_versions},
        "command": "python benchmarks/merge.py"
        + (" --quick" if args.quick else "")
        + (" --mergekit-python PATH" if args.mergekit_python else ""),
        "model": model,
        "checkpoints": 8,
        "rounds": rounds,
        "summary": summary,
        "memory_budget_mb": budget_mb,
        "flat": flat_rows,
        "agreement": agreement,
        "raw": {"rows": rows, "flat": flat},
    }
    stem = result_stem(m, v, kind="merge", tag="quick" if args.quick else "")
    written = write_result(args.out, stem, result, _markdown(result))
    print("\n".join(map(str, written)))
    print(_markdown(result))


def _markdown(r: dict[str, Any]) -> str:
    m, model, s = r["machine"], r["model"], r["summary"]
    peer = r["peer"]["name"] + (f" {r['peer']['mergekit']}" if "mergekit" in r["peer"] else "")
    lines = [
        f"# polyak merge: {r['checkpoints']} checkpoints of a {model['parameters'] / 1e6:.1f}M-"
        "parameter Llama",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, load average before {m['load_before']} and "
        f"after {m['load']}; {m['date']}. Command: `{r['command']}`. Versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        + f"; peer: {peer}. Medians of {r['rounds']} rounds, each run in its own process "
        "(one torch thread).",
        "",
        "Times: `read` and `merge` are timed inside their processes (the call itself); "
        "`process` is the whole command (Python start-up and imports included), the only "
        "time the peer's command line gives.",
        "",
        "| page cache | read every input once | polyak merge | ratio (goal <= 1.3) | "
        f"polyak process | {r['peer']['name']} process | polyak peak RSS (during the merge, above "
        "the process's RSS before it) | peer peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cache, row in s.items():
        lines.append(
            f"| {cache} | {row['read_s']:.2f} s | {row['polyak_s']:.2f} s | {row['ratio']:.2f} "
            f"| {row['polyak_process_s']:.2f} s | {row['peer_process_s']:.2f} s | "
            f"{row['polyak_peak_mb']:.0f} MB ({row['polyak_merge_extra_mb']:.0f} MB) | "
            f"{row['peer_peak_mb']:.0f} MB |"
        )
    lines += [
        "",
        f"Memory budget: 3 x the largest tensor ({model['largest_tensor_bytes'] / 2**20:.1f} MiB)"
        f" + 200 MB = {r['memory_budget_mb']:.0f} MB above the baseline.",
        "",
        "| checkpoints | polyak peak RSS | during the merge, above the RSS before it | merge "
        "(in process) |",
        "|---|---|---|---|",
    ]
    for n, row in r["flat"].items():
        lines.append(f"| {n} | {row['peak_mb']:.0f} MB | {row['extra_mb']:.0f} MB | "
                     f"{row['seconds']:.2f} s |")  # fmt: skip
    a = r["agreement"]
    lines += [
        "",
        f"polyak vs the float64 sum: largest error {a['polyak_vs_float64_rel']:.1e} of the "
        f"largest value; polyak vs the peer: largest difference {a['polyak_vs_peer_max_abs']:.1e}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
