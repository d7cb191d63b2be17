"""polyak.export: only the chosen average, at the chosen dtype (rounded once), with metadata,
written all or none; Hugging Face folders that plain from_pretrained loads."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import polyak
import polyak.export
from finetune_helpers import tiny_llama, train
from torch_helpers import bn_net, randomize_


def trained_ema(model: nn.Module, **kwargs) -> polyak.EMA:
    ema = polyak.EMA(model, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        randomize_(model, gen)
        ema.update()
    return ema


def test_bf16_export_is_the_fp32_average_rounded_once_at_half_the_bytes(tmp_path):
    model = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Linear(256, 8))
    ema = trained_ema(model, decay={"slow": 0.99, "fast": 0.9})
    low = polyak.export.save(ema, tmp_path / "slow.bf16.safetensors", "slow", torch.bfloat16)
    full = polyak.export.save(ema, tmp_path / "slow.fp32.safetensors", "slow", torch.float32)
    avg = ema.averaged_state_dict("slow")
    got = load_file(low)
    assert sorted(got) == sorted(model.state_dict())
    for k, v in avg.items():
        if v.is_floating_point():
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k
        else:
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    fp32 = load_file(full)
    for k, v in fp32.items():
        assert torch.equal(v, avg[k]), k
    data = [sum(t.nbytes for t in d.values() if t.is_floating_point()) for d in (got, fp32)]
    assert 2 * data[0] == data[1] and os.path.getsize(low) < 0.51 * os.path.getsize(full)
    with safe_open(str(low), "pt") as f:
        meta = f.metadata()
    assert meta["polyak.average"] == "slow" and meta["polyak.dtype"] == "bfloat16"
    assert meta["polyak.schedule"] == '{"decay": 0.99, "kind": "constant"}'
    assert (meta["polyak.step"], meta["polyak.updates"]) == ("5", "5")
    assert meta["polyak.version"] == polyak.__version__ and meta["format"] == "pt"


def test_default_dtype_is_the_models_and_frozen_tensors_are_complete(tmp_path):
    model = bn_net().to(torch.bfloat16)
    model[0].requires_grad_(False)
    ema = trained_ema(model, decay=0.9)
    assert "0.weight" not in ema.layout()
    got = load_file(polyak.export.save(ema, tmp_path / "avg.safetensors"))
    assert sorted(got) == sorted(model.state_dict())
    for k, v in ema.averaged_state_dict().items():
        assert torch.equal(got[k], v.to(model.state_dict()[k].dtype)), k
    assert torch.equal(got["0.weight"], model[0].weight)  # frozen: the model's own


def test_tied_weights_are_saved_under_each_name(tmp_path):
    from torch_helpers import Tied

    model = Tied()
    ema = trained_ema(model, decay=0.9)
    got = load_file(polyak.export.save(ema, tmp_path / "tied.safetensors"))
    assert torch.equal(got["emb.weight"], got["head.weight"])
    fresh = Tied()
    fresh.load_state_dict(got)
    assert fresh.head.weight is fresh.emb.weight


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    model = bn_net()
    ema = trained_ema(model, decay=0.9)
    path = polyak.export.save(ema, tmp_path / "avg.safetensors")
    before = path.read_bytes()
    randomize_(model, torch.Generator().manual_seed(1))
    ema.update()
    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="injected"):
        polyak.export.save(ema, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["avg.safetensors"]


def test_nonfinite_average_and_bad_arguments_are_named_errors(tmp_path):
    model = bn_net()
    ema = polyak.EMA(model, decay=0.9)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ema.update()
    with pytest.raises(polyak.NonFiniteError, match=r"0\.weight.*nothing was exported"):
        polyak.export.save(ema, tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)
    good = polyak.EMA(bn_net(), decay=0.9)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        polyak.export.save(good, tmp_path / "x.safetensors", dtype=torch.int8)
    with pytest.raises(TypeError, match="polyak.export.save"):
        polyak.export.save_pretrained(good, tmp_path / "folder")


def test_save_pretrained_writes_a_folder_plain_from_pretrained_loads(tmp_path):
    pytest.importorskip("transformers")  # not in the oldest-versions job
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    ema = polyak.EMA(model, decay=0.9)
    train(model, ema, steps=3)
    polyak.export.save_pretrained(ema, tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert loaded.dtype == torch.bfloat16 and model.dtype == torch.float32
    avg = ema.averaged_state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, avg[k].to(torch.bfloat16)), k
    with safe_open(str(tmp_path / shards[0]), "pt") as f:
        assert f.metadata()["polyak.updates"] == "3"
    polyak.export.save_pretrained(ema, tmp_path)  # again, in one file: the shards go
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_save_pretrained_failing_midway_changes_nothing(tmp_path, monkeypatch):
    pytest.importorskip("transformers")  # not in the oldest-versions job
    model = tiny_llama()
    ema = polyak.EMA(model, decay=0.9)
    train(model, ema, steps=1)
    polyak.export.save_pretrained(ema, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    train(model, ema, steps=1, seed=1)
    real = type(model).save_pretrained

    def fail_after_writing(self, directory, **kwargs):
        real(self, directory, **kwargs)
        raise OSError("injected")

    monkeypatch.setattr(type(model), "save_pretrained", fail_after_writing)
    with pytest.raises(OSError, match="injected"):
        polyak.export.save_pretrained(ema, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
