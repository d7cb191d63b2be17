"""``polyak.merge`` on what real frameworks save (slow tier): a Hugging Face Trainer's
``checkpoint-N`` folders, ``save_pretrained``'s sharded safetensors (the merge loaded back by
``from_pretrained``), a Lightning Trainer's ``.ckpt`` files; and the peak memory of a merge, flat
in the number of checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyak

pytestmark = pytest.mark.slow
EPS32 = 2.0**-24


def _close_to_mean(merged: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]):
    for k, v in states[-1].items():
        if not v.is_floating_point():
            assert torch.equal(merged[k], v), k
            continue
        ref = sum(s[k].double() for s in states) / len(states)
        size = sum(s[k].double().abs() for s in states) / len(states)
        bound = (len(states) + 2) * EPS32 * size + torch.finfo(v.dtype).eps / 2 * ref.abs()
        assert bool(((merged[k].double() - ref).abs() <= bound).all()), k


def test_hf_trainer_checkpoints_merge_and_load_with_from_pretrained(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    rows = [{"input_ids": torch.randint(0, 64, (16,)).tolist()} for _ in range(32)]
    for r in rows:
        r["labels"] = r["input_ids"]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, save_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], logging_steps=100, use_cpu=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows).train()
    folders = sorted((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    sources = polyak.merge.open_sources(folders)
    assert [s.step for s in sources] == [2, 4, 6] and all(s.kind == "hf" for s in sources)
    for s in sources:
        s.close()
    w = polyak.merge.weights.lawa([2, 4, 6], 3)
    polyak.merge.merge(folders, w, tmp_path / "merged")
    states = [load_file(f / "model.safetensors") for f in folders]
    _close_to_mean(load_file(tmp_path / "merged" / "model.safetensors"), states)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for k, v in loaded.state_dict().items():
        if k in merged:
            assert torch.equal(v, merged[k]), k


def test_save_pretrained_shards_merge_into_shards_from_pretrained_reads(tmp_path):
    from transformers import LlamaForCausalLM

    from finetune_helpers import tiny_llama

    models = []
    for i in range(3):
        models.append(tiny_llama(i, vocab_size=100))
        models[-1].save_pretrained(tmp_path / f"m{i}", max_shard_size="20KB")
    assert (tmp_path / "m0" / "model.safetensors.index.json").exists()
    polyak.merge.merge([tmp_path / f"m{i}" for i in range(3)], [1, 1, 1], tmp_path / "out",
                       torch.bfloat16, max_shard_bytes=40_000)  # fmt: skip
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16
    for k, v in loaded.state_dict().items():
        ref = sum(m.state_dict()[k].double() for m in models) / 3
        assert torch.equal(v, ref.float().bfloat16()) or (v.double() - ref).abs().max() < 2e-2, k


def test_lightning_trainer_checkpoints_merge(tmp_path):
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))

        def training_step(self, batch, i):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(48, 4)),
                                       batch_size=8)  # fmt: skip
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1,
                            filename="{step}")  # fmt: skip
    trainer = L.Trainer(max_steps=6, callbacks=[every], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(Module(), data)
    paths = sorted((tmp_path / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    sources = polyak.merge.open_sources(paths)
    assert [s.step for s in sources] == [2, 4, 6] and sources[0].kind == "lightning"
    for s in sources:
        s.close()
    polyak.merge.merge(paths, [1, 1, 1], tmp_path / "out")
    states = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    merged = load_file(tmp_path / "out" / "model.safetensors")
    _close_to_mean(merged, states)
    assert merged["net.1.num_batches_tracked"].item() == 6  # copied from the latest


PEAK = """
import json, sys
import torch
import polyak.merge
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak so far (imports) is forgotten: VmHWM restarts from VmRSS
base = status("VmRSS")
paths = json.loads(sys.argv[1])
polyak.merge.merge(paths, [1.0] * len(paths), sys.argv[2])
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def test_peak_memory_is_flat_in_the_number_of_checkpoints(tmp_path):
    largest = 4_000_000  # float32: 16 MB
    paths = []
    gen = torch.Generator().manual_seed(0)
    for i in range(16):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file({"big": torch.randn(largest, generator=gen), "small": torch.randn(1000, 100,
                   generator=gen)}, paths[-1])  # fmt: skip
    src = str(Path(polyak.__file__).resolve().parents[1])
    extra = {}
    for n in (4, 16):
        done = subprocess.run(
            [sys.executable, "-c", PEAK, json.dumps([str(p) for p in paths[:n]]),
             str(tmp_path / f"out{n}")],
            capture_output=True, text=True, check=True, env={"PYTHONPATH": src},
        )  # fmt: skip
        got = json.loads(done.stdout.strip().splitlines()[-1])
        extra[n] = got["peak"] - got["base"]
    budget = 3 * largest * 4 / 2**20  # MB: three largest tensors
    assert extra[16] - extra[4] < 8, extra  # flat: the slots do not grow with the sources
    assert max(extra.values()) < budget, (extra, budget)
