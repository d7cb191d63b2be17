"""``polyak.merge.merge``: every kind of source read as untrusted input, the weighted sum equal to
a float64 reference within float32 rounding, integer buffers copied from the latest source,
mismatches and non-finite tensors named before any output is in place, outputs all or none,
never over an input, each input byte read once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyak
from polyak.errors import CheckpointError, NonFiniteError
from polyak.merge import merge, open_sources
from polyak.merge._safetensors import SafetensorsFile

EPS32 = 2.0**-24


def _states(n=4, seed=0):
    """``n`` checkpoints of a small model with BatchNorm (an integer buffer) and a bf16 tensor."""
    torch.manual_seed(seed)
    out = []
    for i in range(n):
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["1.num_batches_tracked"] = torch.tensor(10 * (i + 1))
        sd["1.running_mean"] = torch.randn(7)
        sd["emb"] = torch.randn(3, 4).bfloat16()
        out.append(sd)
    return out


def _reference(states, weights):
    total = sum(weights)
    return {
        k: sum(w / total * s[k].double() for w, s in zip(weights, states))
        for k, v in states[-1].items()
        if v.is_floating_point()
    }


def _check(merged, states, weights):
    """Averaged tensors within float32 rounding (and their own dtype's) of the float64 sum;
    integer tensors those of the latest state."""
    ref = _reference(states, weights)
    total = sum(weights)
    for k, v in states[-1].items():
        got = merged[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        if not v.is_floating_point():
            assert torch.equal(got, v), k
            continue
        size = sum(abs(w) / total * s[k].double().abs() for w, s in zip(weights, states))
        unit = torch.finfo(v.dtype).eps / 2  # half an ulp of the stored dtype
        bound = (len(states) + 2) * EPS32 * size + unit * ref[k].abs()
        assert bool(((got.double() - ref[k]).abs() <= bound).all()), k


def _hf_folder(path: Path, sd, step=None, shards=1):
    path.mkdir(parents=True)
    names = list(sd)
    if shards == 1:
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    else:
        wmap = {}
        for i in range(shards):
            part = {k: sd[k] for k in names[i::shards]}
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, path / name)
            wmap.update(dict.fromkeys(part, name))
        index = {"metadata": {"total_size": 0}, "weight_map": wmap}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "dtype": "float32"}))
    if step is not None:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def _write(kind, tmp_path, states):
    """The states as checkpoints of one kind; returns the paths (and the steps they carry)."""
    paths = []
    for i, sd in enumerate(states):
        step = 100 * (i + 1)
        if kind == "hf":
            paths.append(_hf_folder(tmp_path / f"checkpoint-{step}", sd, step))
        elif kind == "hf-sharded":
            paths.append(_hf_folder(tmp_path / f"run{i}", sd, shards=3))
        elif kind == "hf-bin":
            folder = tmp_path / f"checkpoint-{step}"
            folder.mkdir()
            torch.save(sd, folder / "pytorch_model.bin")
            paths.append(folder)
        elif kind == "safetensors":
            save_file(sd, tmp_path / f"{i}.safetensors", metadata={"step": str(step)})
            paths.append(tmp_path / f"{i}.safetensors")
        elif kind == "pt":
            torch.save(sd, tmp_path / f"{i}.pt")
            paths.append(tmp_path / f"{i}.pt")
        elif kind == "ckpt":  # what Lightning saves (a real Trainer's: test_merge_frameworks)
            torch.save({"state_dict": sd, "global_step": step, "epoch": 0}, tmp_path / f"{i}.ckpt")
            paths.append(tmp_path / f"{i}.ckpt")
    return paths


KINDS = ["hf", "hf-sharded", "hf-bin", "safetensors", "pt", "ckpt"]
STEPS = {"hf": [100, 200, 300, 400], "hf-bin": [100, 200, 300, 400], "safetensors":
         [100, 200, 300, 400], "ckpt": [100, 200, 300, 400]}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_kind_merges_to_the_float64_weighted_sum(kind, tmp_path):
    states = _states()
    paths = _write(kind, tmp_path, states)
    sources = open_sources(paths)
    try:
        assert [s.step for s in sources] == STEPS.get(kind, [None] * 4)
    finally:
        for s in sources:
            s.close()
    weights = [0.1, 0.4, 0.2, 0.3]
    result = merge(paths, weights, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    _check(merged, states, weights)
    assert result.copied == ["1.num_batches_tracked"]
    assert sorted(result.averaged) == sorted(k for k in states[0] if k != "1.num_batches_tracked")


def test_ema_state_files_and_post_hoc_stores_merge_too(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
    ph = polyak.PostHocEMA(model, tmp_path / "store", snapshot_every=5, keep_live=True,
                           snapshot_dtype=torch.float32)  # fmt: skip
    ema = polyak.EMA(model, {"fast": 0.9, "slow": 0.99})
    saved = []
    for step in range(1, 16):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model(torch.randn(8, 5))  # moves the BatchNorm statistics and counter
        ph.update()
        ema.update()
        if step % 5 == 0:
            torch.save(ema.state_dict(), tmp_path / f"ema{step}.pt")
            saved.append({**{k: v.clone() for k, v in ema.averaged_tensors("slow").items()}})
    ph.close()
    paths = [f"{tmp_path / f'ema{s}.pt'}::slow" for s in (5, 10, 15)]
    sources = open_sources(paths)
    assert [s.step for s in sources] == [5, 10, 15] and sources[0].kind == "ema"
    for s in sources:
        s.close()
    merge(paths, [1, 1, 2], tmp_path / "ema-out")
    _check(load_file(tmp_path / "ema-out" / "model.safetensors"), saved, [1, 1, 2])
    with pytest.raises(ValueError, match=r"keeps 2 averages \['fast', 'slow'\]; choose one"):
        open_sources([tmp_path / "ema5.pt"])
    # the store: its live snapshots (the run's checkpoints), read through its manifest
    live = open_sources([tmp_path / "store"])
    steps = [s.step for s in live]
    assert steps == [5, 10, 15] and all(s.gamma is None for s in live)
    for s in live:
        s.close()
    merge([tmp_path / "store"], [0.2, 0.3, 0.5], tmp_path / "store-out")
    files = [load_file(tmp_path / "store" / n) for n in sorted(os.listdir(tmp_path / "store"))
             if n.endswith(".safetensors") and "live" in n]  # fmt: skip
    _check(load_file(tmp_path / "store-out" / "model.safetensors"), files, [0.2, 0.3, 0.5])
    one = open_sources([f"{tmp_path / 'store'}::sigma_rel=0.05"])
    assert [s.step for s in one] == [5, 10, 15] and one[0].gamma is not None
    for s in one:
        s.close()


def test_the_output_is_hugging_face_layout_with_the_merge_in_its_metadata(tmp_path):
    states = _states()
    paths = _write("hf", tmp_path, states)
    w = polyak.merge.weights.lawa([100, 200, 300, 400], 2)
    result = merge(paths, w, tmp_path / "out", max_shard_bytes=200)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    merged = {}
    for shard in shards:
        part = load_file(tmp_path / "out" / shard)
        assert all(index["weight_map"][k] == shard for k in part)
        merged.update(part)
        with SafetensorsFile(open(tmp_path / "out" / shard, "rb", buffering=0), Path(shard)) as f:
            info = json.loads(f.metadata["polyak.merge"])
            assert f.metadata["format"] == "pt" and f.metadata["step"] == "400"
    assert info["method"] == "lawa(k=2)" and info["weights"] == [0, 0, 0.5, 0.5]
    assert info["steps"] == [100, 200, 300, 400] and info["polyak"] == polyak.__version__
    assert info["sources"] == [str(p) for p in paths]
    _check(merged, states, list(w))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "toy"
    assert result.nbytes == sum(v.numel() * v.element_size() for v in states[0].values())


def test_dtype_and_float64_accumulation(tmp_path):
    states = [{"w": torch.randn(1000, dtype=torch.float64)} for _ in range(3)]
    paths = []
    for i, sd in enumerate(states):
        save_file(sd, tmp_path / f"{i}.safetensors")
        paths.append(tmp_path / f"{i}.safetensors")
    merge(paths, [1, 2, 3], tmp_path / "f64")  # float64 sources: summed in float64
    ref = _reference(states, [1, 2, 3])["w"]
    got = load_file(tmp_path / "f64" / "model.safetensors")["w"]
    assert got.dtype == torch.float64 and (got - ref).abs().max() < 1e-14
    merge(paths, [1, 2, 3], tmp_path / "bf16", torch.bfloat16)
    got = load_file(tmp_path / "bf16" / "model.safetensors")["w"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref.bfloat16())


def test_mismatches_are_named_before_anything_is_written(tmp_path):
    states = _states(3)
    broken = [dict(s) for s in states]
    del broken[1]["0.bias"]
    paths = _write("safetensors", tmp_path, broken)
    with pytest.raises(CheckpointError, match=r"1.safetensors has no tensor '0.bias', which .*2"):
        merge(paths, [1, 1, 1], tmp_path / "out")
    states[2]["0.weight"] = torch.zeros(7, 6)
    paths = _write("pt", tmp_path, states)
    with pytest.raises(CheckpointError, match=r"'0.weight' has shape \[7, 5\] in .*0.pt but "
                                              r"\[7, 6\] in .*2.pt"):  # fmt: skip
        merge(paths, [1, 1, 1], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_finite_tensor_is_named_and_nothing_is_written(tmp_path):
    states = _states(3)
    states[1]["0.weight"][2, 3] = float("nan")
    paths = _write("safetensors", tmp_path, states)
    merge(paths, [1, 0, 1], tmp_path / "skipped")  # weight 0: never read
    before = (tmp_path / "skipped" / "model.safetensors").read_bytes()
    with pytest.raises(NonFiniteError, match=r"'0.weight' holds inf/nan in .*1.safetensors"):
        merge(paths, [1, 1, 1], tmp_path / "skipped")
    assert (tmp_path / "skipped" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "skipped")) == ["model.safetensors"]  # no temporaries


def test_a_failure_midway_replaces_nothing_and_leaves_nothing(tmp_path, monkeypatch):
    states = _states()
    paths = _write("hf", tmp_path, states)
    merge(paths, [1, 1, 1, 1], tmp_path / "out", max_shard_bytes=200)
    before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    from polyak.merge import _writer

    calls = {"n": 0}
    original = _writer.ShardWriter.write

    def failing(self, name, chunk):
        calls["n"] += 1
        if calls["n"] == 4:  # inside the second shard
            raise OSError(28, "No space left on device")
        return original(self, name, chunk)

    monkeypatch.setattr(_writer.ShardWriter, "write", failing)
    with pytest.raises(OSError, match="No space left"):
        merge(paths, [1, 2, 3, 4], tmp_path / "out", max_shard_bytes=200)
    after = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    assert after == before


def test_never_over_an_input_nor_beside_stale_weights(tmp_path):
    states = _states(2)
    paths = _write("hf", tmp_path, states)
    with pytest.raises(ValueError, match="holds the input .*checkpoint-200/model.safetensors"):
        merge(paths, [1, 1], paths[1])
    with pytest.raises(ValueError, match="holds the input"):
        merge(paths, [1, 1], tmp_path)
    merge(paths, [1, 1], tmp_path / "out", max_shard_bytes=200)
    with pytest.raises(ValueError, match=r"holds model-00001-of-0000\d.safetensors .* choose an"):
        merge(paths, [1, 1], tmp_path / "out")  # one shard now: the old shards would stay


def test_each_input_byte_is_read_once(tmp_path, monkeypatch):
    states = [{"a": torch.randn(300_000), "b": torch.randn(10), "n": torch.tensor(3)}] * 3
    paths = _write("safetensors", tmp_path, states)
    read: dict[str, int] = {}
    original = SafetensorsFile.read

    def counting(self, name, begin, end, buffer):
        read[self.path.name] = read.get(self.path.name, 0) + (end - begin) * 4 * (name != "n")
        return original(self, name, begin, end, buffer)

    monkeypatch.setattr(SafetensorsFile, "read", counting)
    merge(paths, [1, 1, 1], tmp_path / "out")
    assert read == {p.name: 300_010 * 4 for p in paths}  # "n": only from the latest


UNTRUSTED = {
    "header length": (lambda p: p.write_bytes((10**12).to_bytes(8, "little") + b"{}"),
                      "header length 1000000000000 exceeds"),
    "not json": (lambda p: p.write_bytes((4).to_bytes(8, "little") + b"{{{{"),
                 "its header is not JSON"),
    "outside data": (lambda p: _raw(p, {"w": {"dtype": "F32", "shape": [4],
                                              "data_offsets": [0, 16]}}, 8),
                     r"'w' of shape \[4\] \(F32\) has the byte range \[0, 16\), not 16 bytes "
                     "inside the 8"),
    "overlap": (lambda p: _raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                               12), "the bytes of tensors 'a' and 'b' overlap"),
    "dtype": (lambda p: _raw(p, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8),
              "'w' has the dtype 'C64', which polyak cannot read"),
}  # fmt: skip


def _raw(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * data)


@pytest.mark.parametrize("case", sorted(UNTRUSTED))
def test_a_malformed_safetensors_file_is_named(case, tmp_path):
    make, message = UNTRUSTED[case]
    make(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=message) as e:
        open_sources([tmp_path / "bad.safetensors"])
    assert "bad.safetensors" in str(e.value)


def test_untrusted_folders_indexes_and_torch_files(tmp_path):
    sd = _states(1)[0]
    folder = _hf_folder(tmp_path / "run", sd, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"weight_map\['0.weight'\] '../elsewhere.safe"):
        open_sources([folder])
    outside = tmp_path / "outside.safetensors"
    save_file(sd, outside)
    link = _hf_folder(tmp_path / "linked", {"x": torch.ones(1)})
    (link / "model.safetensors").unlink()
    (link / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a symlink to .*outside.safetensors, outside"):
        open_sources([link])
    state = _hf_folder(tmp_path / "checkpoint-7", {"x": torch.ones(1)}, step=9)
    with pytest.raises(CheckpointError, match="'global_step' is 9, but the folder is named"):
        open_sources([state])
    (state / "trainer_state.json").write_text(json.dumps({"global_step": "7"}))
    with pytest.raises(CheckpointError, match="'global_step' must be an integer >= 0, got '7'"):
        open_sources([state])
    torch.save({"w": torch.ones(1), "obj": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"cannot be read with torch.load\(weights_only"):
        open_sources([tmp_path / "pickled.pt"])
    torch.save({"w": torch.ones(1), "lr": 0.1}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="'lr' is a float, not a tensor"):
        open_sources([tmp_path / "mixed.pt"])
    with pytest.raises(CheckpointError, match="holds no model weights"):
        open_sources([tmp_path / "checkpoint-7" / ".."])
    with pytest.raises(CheckpointError, match="does not exist"):
        open_sources([tmp_path / "nothing.safetensors"])
