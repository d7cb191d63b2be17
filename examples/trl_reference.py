"""TR-DPO with polyak: the reference model of TRL's ``DPOTrainer`` kept as a polyak average of
the policy (``ref <- 0.6*policy + 0.4*ref`` every ``sync_steps`` steps), checkpointed with the
run and resumed exactly.

A two-layer Llama built from a config and a word-level tokenizer built in code (nothing is
downloaded) are trained by DPO on random preference pairs. ``ReferenceCallback`` replaces the
trainer's reference by a view of the average (no second copy of the model) and updates it every
``sync_steps`` optimizer steps, as TRL's own ``sync_ref_model=True`` does.

    python examples/trl_reference.py            # ~15 s on 2 CPU cores
    python examples/trl_reference.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging
from trl import DPOConfig, DPOTrainer

from polyak.integrations.trl import ReferenceCallback


def tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def pairs(n: int) -> Dataset:
    gen = torch.Generator().manual_seed(0)

    def words(k: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(3, 61, (k,), generator=gen))

    rows = [(words(4), words(3), words(3)) for _ in range(n)]
    return Dataset.from_dict(
        {
            "prompt": [r[0] for r in rows],
            "chosen": [r[1] for r in rows],
            "rejected": [r[2] for r in rows],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps (for the tests)")
    steps = 4 if parser.parse_args().fast else 40
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    policy = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        )
    )
    callback = ReferenceCallback(mixup_alpha=0.6, sync_steps=2)
    args = DPOConfig(
        tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=args,
        train_dataset=pairs(64),
        processing_class=tokenizer(),
        callbacks=[callback],
    )
    trainer.train()
    ema = callback.ema
    assert ema is not None and ema.timeline.num_updates == steps // 2
    print(
        f"{steps} DPO steps, {ema.timeline.num_updates} reference syncs; the reference is "
        f"{type(trainer.ref_model).__name__} over the average's storage "
        f"({ema.nbytes / 1e3:.0f} kB)"
    )


if __name__ == "__main__":
    main()
