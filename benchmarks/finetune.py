"""Fine-tuning figures: what the averages of a LoRA model hold, what an update costs, and what
the exported average weighs. ``python benchmarks/finetune.py [--quick]``.

For Llama models built from configs (nothing downloaded) with a LoRA adapter of rank 8 (PEFT's
default targets ``q_proj``/``v_proj``, and every linear layer):

* bytes held by ``polyak.EMA(model)`` (frozen parameters read from the model, the default) and
  by ``EMA(model, frozen="average")`` (every parameter stored, as before), over the model's
  bytes;
* the median time of ``ema.update()`` for both, and of the check that runs at every update
  for the frozen parameters (one ``requires_grad`` read each);
* the bytes of the average exported by ``polyak.export.save`` at float32 and bfloat16.

Results: ``benchmarks/results/<date>_finetune_<cpu>...`` (json and markdown), with the machine
and its load (``uptime``) when measured.
"""

from __future__ import annotations

import argparse
import operator
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import polyak
import polyak.export
from polyak.cli.common import machine, result_stem, versions, write_result

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # Llama configs: the tests' tiny one and a small one (~34M parameters)
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=64),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, vocab_size=8000),
}
TARGETS = {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}


def _model(shape: str, targets: Any) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **SHAPES[shape]
    )
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=targets))


def _median_us(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(shape: str, targets: str, rounds: int) -> dict[str, Any]:
    model = _model(shape, TARGETS[targets])
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    live = polyak.EMA(model, decay=0.999)
    every = polyak.EMA(model, decay=0.999, frozen="average")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    check = operator.attrgetter("requires_grad")
    row = {
        "shape": shape,
        "lora_targets": targets,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": model_bytes,
        "adapter_bytes": adapter,
        "ema_bytes": live.nbytes,
        "ema_bytes_frozen_average": every.nbytes,
        "ratio": live.nbytes / model_bytes,
        "ratio_frozen_average": every.nbytes / model_bytes,
        "frozen_parameters": len(frozen),
        "update_us": _median_us(live.update, rounds),
        "update_us_frozen_average": _median_us(every.update, rounds),
        "frozen_check_us": _median_us(lambda: any(map(check, frozen)), rounds * 10),
    }
    with tempfile.TemporaryDirectory() as d:
        for dtype in (torch.float32, torch.bfloat16):
            path = polyak.export.save(live, Path(d) / "avg.safetensors", dtype=dtype)
            row[f"export_bytes_{str(dtype)[6:]}"] = path.stat().st_size
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only, few rounds")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 5 if args.quick else 50
    shapes = ["tiny"] if args.quick else ["tiny", "small"]
    rows = [measure(s, t, rounds) for s in shapes for t in TARGETS]
    m, v = machine(), versions(("polyak", "torch", "transformers", "peft"))
    lines = [
        "# Fine-tuning: averages of a LoRA model, update time, export size",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, load {m['load']} (1/5/15 min) at {m['date']}; "
        f"torch threads {m.get('torch_threads')}; versions {v}.",
        "",
        "| model | LoRA r=8 on | params | model MB | EMA MB (frozen live) | ratio | EMA MB "
        "(frozen='average') | update us (live / average) | frozen check us (n) | export "
        "fp32 / bf16 MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['lora_targets']} | {r['parameters']:,} | "
            f"{r['model_bytes'] / 1e6:.3f} | {r['ema_bytes'] / 1e6:.4f} | {r['ratio']:.4f} | "
            f"{r['ema_bytes_frozen_average'] / 1e6:.3f} | {r['update_us']:.0f} / "
            f"{r['update_us_frozen_average']:.0f} | {r['frozen_check_us']:.2f} "
            f"({r['frozen_parameters']}) | {r['export_bytes_float32'] / 1e6:.3f} / "
            f"{r['export_bytes_bfloat16'] / 1e6:.3f} |"
        )
    markdown = "\n".join(lines) + "\n"
    stem = result_stem(m, v, "finetune", tag="quick" if args.quick else "")
    out = write_result(args.out, stem, {"machine": m, "versions": v, "rows": rows}, markdown)
    print(markdown)
    print("written:", *out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
