"""Tiny language models for the fine-tuning tests: built from configs, nothing downloaded."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, **overrides):
    """A two-layer Llama (~50k parameters) from a config, weights from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config))


def lora(model, r: int = 8, adapter: str = "default", **kwargs):
    """``model`` with a LoRA adapter on the attention projections (B initialised non-zero, so
    that the adapter changes the outputs from the start)."""
    from peft import LoraConfig, get_peft_model

    kwargs.setdefault("init_lora_weights", False)
    config = LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], **kwargs)
    return get_peft_model(model, config, adapter_name=adapter)


def train(model, ema, steps: int, seed: int = 0, lr: float = 0.05) -> None:
    """``steps`` real SGD steps of next-token loss on random tokens, one EMA update each."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 8), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update()


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits
