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


def word_tokenizer():
    """A word-level tokenizer over ``<pad> <eos> <unk> w0 .. w60``, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def preference_data(n: int = 16, seed: int = 0):
    """``n`` preference pairs of random words (prompt, chosen, rejected), built in code."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)

    def sentence(k: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 61, (k,), generator=gen))

    rows = [(sentence(4), sentence(3), sentence(3)) for _ in range(n)]
    return Dataset.from_dict(
        {k: [r[i] for r in rows] for i, k in enumerate(("prompt", "chosen", "rejected"))}
    )


def dpo_llama(seed: int = 0):
    """``tiny_llama`` with the word tokenizer's special tokens."""
    return tiny_llama(seed, pad_token_id=0, eos_token_id=1, bos_token_id=1)
