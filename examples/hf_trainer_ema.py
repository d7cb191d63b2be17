"""An EMA of the weights in the Hugging Face ``Trainer``: evaluated, checkpointed, resumed,
exported with ``save_pretrained``.

A 2-layer GPT-2 built from a config (nothing is downloaded) learns sequences that count up by a
random step modulo 64. ``EMACallback(evaluate="both")`` updates the average once per optimizer
step (``gradient_accumulation_steps=2``) and reports ``eval_loss`` and ``eval_ema_loss`` at each
evaluation; every ``checkpoint-N/`` holds the EMA state. The script then resumes a second run
from the middle checkpoint and checks that its average equals the uninterrupted one, shows that
EMA files copied in from another checkpoint are refused (they belong to another step), and
writes the average with ``cb.save_pretrained`` for ``from_pretrained``.

    python examples/hf_trainer_ema.py            # ~20 s on 2 CPU cores
    python examples/hf_trainer_ema.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

import polyak
from polyak.integrations.transformers import EMACallback


class Counting(Dataset):
    """Sequences ``a, a+b, a+2b, ... (mod 64)`` with random ``a`` and ``b``."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 64, (n, 1), generator=g)
        step = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(16)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    config.bos_token_id = config.eos_token_id = 0
    return GPT2LMHeadModel(config)


def run(out: Path, steps: int, resume: Path | None = None) -> tuple[Trainer, EMACallback]:
    args = TrainingArguments(
        str(out),
        max_steps=steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=steps // 4,
        save_strategy="steps",
        save_steps=steps // 2,
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    cb = EMACallback(decay=0.95, evaluate="both")
    trainer = Trainer(
        model=gpt2(),
        args=args,
        train_dataset=Counting(1024, seed=0),
        eval_dataset=Counting(128, seed=1),
        callbacks=[cb],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, cb


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args(argv)
    steps = 16 if args.fast else 120
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        trainer, cb = run(out / "whole", steps)
        print(f"{cb.ema.step} optimizer steps, {cb.ema.timeline.num_updates} EMA updates")
        print(" step  eval_loss live  eval_loss EMA")
        history = trainer.state.log_history
        live = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
        averaged = {e["step"]: e["eval_ema_loss"] for e in history if "eval_ema_loss" in e}
        for step in sorted(live):
            print(f"{step:5d}  {live[step]:14.4f}  {averaged[step]:13.4f}")

        middle = out / "whole" / f"checkpoint-{steps // 2}"
        _, again = run(out / "whole", steps, resume=middle)
        diff = max(
            (v - again.ema.averaged_tensors()[k]).abs().max().item()
            for k, v in cb.ema.averaged_tensors().items()
        )
        print(f"resumed from {middle.name}: largest difference from the uninterrupted average")
        print(f"  {diff:.3g} (the EMA state lives in {middle.name}/polyak_ema.*)")

        # the last checkpoint's EMA files copied over the middle one's: refused, not resumed
        last = out / "whole" / f"checkpoint-{steps}"
        for f in middle.glob("polyak_ema*"):
            f.unlink()
        for f in last.glob("polyak_ema*"):
            shutil.copy(f, middle)
        try:
            run(out / "whole", steps, resume=middle)
            raise SystemExit("EMA files of another checkpoint were resumed")
        except polyak.CheckpointError as e:
            reason = str(e).split(": ", 1)[1].split(": ")[0]  # after the file, the first clause
            print(f"EMA files of {last.name} copied into {middle.name}: refused ({reason})")

        cb.save_pretrained(out / "average")
        model = AutoModelForCausalLM.from_pretrained(out / "average")
        check = Trainer(model=model, args=trainer.args, eval_dataset=Counting(128, seed=1))
        metrics = check.evaluate()
        print(f"from_pretrained of the export: eval_loss {metrics['eval_loss']:.4f}")
    return {"eval_ema_loss": averaged[steps], "eval_loss": live[steps], "resume_diff": diff}


if __name__ == "__main__":
    main()
