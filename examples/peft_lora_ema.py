"""An EMA of a LoRA adapter: only the adapter is averaged, and the averaged adapter is exported
as a PEFT folder and as a bf16 safetensors file.

A two-layer Llama built from a config (nothing is downloaded) gets a LoRA adapter of rank 8 and
learns to repeat random token sequences. ``polyak.EMA(peft_model)`` stores the adapter's
averages only (the frozen base is read from the model); the script prints what that saves,
checks that a PEFT folder written by ``polyak.export.save_pretrained`` loads with
``PeftModel.from_pretrained`` and gives the outputs of the model swapped to the average, and
writes a bf16 file of the whole averaged model with its metadata.

    python examples/peft_lora_ema.py            # ~10 s on 2 CPU cores
    python examples/peft_lora_ema.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import polyak
import polyak.export


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps (for the tests)")
    steps = 10 if parser.parse_args().fast else 200

    model = get_peft_model(base_model(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ema = polyak.EMA(model, decay=0.9)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"averages: {ema.nbytes / 1e3:.1f} kB for a {model_bytes / 1e3:.0f} kB model "
        f"({ema.nbytes / model_bytes:.1%}): the LoRA adapter only"
    )

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 64, (8, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
    print(f"step {steps}: loss {loss.item():.3f}")

    out = Path(tempfile.mkdtemp())
    polyak.export.save_pretrained(ema, out / "adapter", dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base_model(), out / "adapter").eval()
    ids = torch.randint(0, 64, (2, 16), generator=gen)
    with torch.no_grad(), ema.swapped(model):
        expected = model.eval()(input_ids=ids).logits
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    print("PeftModel.from_pretrained(adapter folder) gives the averaged model's outputs")

    path = polyak.export.save(ema, out / "average.bf16.safetensors", dtype=torch.bfloat16)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    print(
        f"{path.name}: {path.stat().st_size / 1e3:.0f} kB, schedule "
        f"{meta['polyak.schedule']}, {meta['polyak.updates']} updates"
    )


if __name__ == "__main__":
    main()
