"""``polyak bench`` in quick mode: runs, checks every candidate, writes results, never crashes."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import polyak
from polyak.cli import bench
from polyak.cli.bench import models, peers, probes


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = bench.BenchConfig(
        quick=True,
        shapes=("transformer", "resnet50", "transformer-bf16"),
        peers=("AveragedModel", "timm-V3", "torch_ema", "ema-pytorch-foreach"),
        multi=2,
        output_dir=str(out),
    )
    config.scale = 0.01
    return bench.run_bench(config), out


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _scratch(shape: str, name: str) -> int:
    """Bytes an update may allocate: none, except that before torch 2.13 (where the goal was
    measured) ``_foreach_lerp_`` of a bf16 flat buffer into a float32 average casts it through a
    2 MiB scratch (seen on torch 2.6, the oldest version polyak declares)."""
    import torch

    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    old_mixed = version < (2, 13) and shape == "transformer-bf16" and "flat_params" in name
    return 2 << 20 if old_mixed and "fp32 model" not in name else 0


def test_quick_run_times_and_checks_every_candidate(quick_result):
    result, _ = quick_result
    assert [s["shape"] for s in result["sections"]] == [
        "transformer",
        "resnet50",
        "transformer-bf16",
    ]
    for section in result["sections"]:
        names = {r["name"] for r in section["rows"]}
        assert {"copy (flat)", "lerp (flat)", "polyak", "polyak flat_params"} <= names
        for row in section["rows"]:
            assert row["median_s"] > 0 and row["q1_s"] <= row["q3_s"]
            if row["kind"] == "polyak":
                if "nonfinite" not in row["name"]:  # its finiteness check allocates the norms
                    assert row["allocated"] <= _scratch(section["shape"], row["name"]), row
                assert row["err"] < 1e-5 and abs(row["moved"] - 1) < 1e-3, row
        if section["shape"] == "transformer":
            assert {"polyak nonfinite=raise", "polyak nonfinite=skip"} <= names
    fp32 = {r["name"]: r for r in result["sections"][0]["rows"]}
    assert "foreach (cached lists)" in fp32
    installed = {"timm-V3": "timm", "torch_ema": "torch_ema", "ema-pytorch-foreach": "ema_pytorch"}
    peers = [p for p in ("AveragedModel", *installed) if p not in installed or _has(installed[p])]
    for peer in peers:  # every installed peer is timed (the oldest-versions job installs none)
        assert fp32[peer]["err"] < 1e-4, fp32[peer]  # the peers compute the same averages
    bf16 = {r["name"]: r for r in result["sections"][2]["rows"]}
    assert "polyak (fp32 model)" in bf16 and ("timm-V3-fp32" in bf16) == _has("timm")
    if _has("torch_ema"):
        assert bf16["torch_ema"]["moved"] < 0.5  # a bf16 average freezes; polyak's does not
    assert bf16["polyak"]["moved"] == pytest.approx(1.0, abs=1e-3)
    multi = result["multi"][0]
    assert multi["k"] == 2 and all(r["err"] < 1e-5 for r in multi["rows"])
    rows = {r["storage"]: r for r in result["precision"]["rows"] if r["decay"] == 0.999}
    assert rows["float32"]["moved"] == pytest.approx(1.0, abs=1e-3)
    assert rows["bfloat16, round-to-nearest"]["moved"] < 0.2
    assert rows["bfloat16, stochastic rounding"]["moved"] == pytest.approx(1.0, abs=0.2)
    goals = {g["goal"] for g in result["goals"]}
    assert "flat_params update, transformer" in goals
    assert "Python overhead per update, 1000 one-element tensors" in goals
    sweep = result["sweep"]["rows"]
    assert [r["tensors"] for r in sweep] == list(bench.SWEEP_TENSORS) == [8, 100, 400, 1000]
    assert all(r["kernels_s"] > 0 and r["default_s"] == r["default_s"] for r in sweep)
    assert result["load"]["before"] and result["load"]["after"]


def test_results_files_name_machine_and_versions(quick_result):
    result, out = quick_result
    files = sorted(os.listdir(out))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    stem = files[0][: -len(".json")]
    assert f"{result['machine']['cores']}c" in stem and "torch-" in stem and stem.endswith("quick")
    with open(out / files[0]) as f:
        saved = json.load(f)
    assert saved["versions"]["torch"] == result["versions"]["torch"]
    text = (out / files[1]).read_text()
    assert "| polyak flat_params |" in text and "### goals" in text and "load average" in text
    assert "### Python overhead per update against the tensor count" in text
    assert "| 1000 |" in text


def test_a_failing_peer_is_skipped_with_its_reason(monkeypatch, capsys):
    real = peers.make_peer

    def broken(name, model, decay):
        if name == "torch_ema":
            raise ImportError("No module named 'torch_ema'")
        return real(name, model, decay)

    monkeypatch.setattr("polyak.cli.bench.run.make_peer", broken)
    config = bench.BenchConfig(
        quick=True,
        shapes=("mlp",),
        peers=("torch_ema", "AveragedModel"),
        multi=0,
        precision=False,
        sweep=False,
        output_dir=None,
    )
    config.scale = 0.01
    result = bench.run_bench(config)
    assert result["skipped"] == {"torch_ema": "ImportError: No module named 'torch_ema'"}
    assert "skipping torch_ema" in capsys.readouterr().out
    assert "AveragedModel" in {r["name"] for r in result["sections"][0]["rows"]}


def test_timm_loads_by_path_without_torchvision():
    if not _has("timm"):
        pytest.skip("timm is not installed")
    module = peers.timm_model_ema()
    assert hasattr(module, "ModelEmaV3")


def test_cli_flags_map_to_config():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--quick",
            "--shapes",
            "mlp,resnet50",
            "--peers",
            "timm-V3",
            "--repeats",
            "4",
            "--no-save",
            "--multi",
            "0",
            "--no-precision",
        ]
    )
    config = bench.config_from_args(args)
    assert config.shapes == ("mlp", "resnet50") and config.peers == ("timm-V3",)
    assert config.output_dir is None and config.multi == 0 and not config.precision
    assert config.repeats == 3  # quick mode caps the rounds
    assert bench.config_from_args(parser.parse_args([])) == bench.BenchConfig()
    with pytest.raises(ValueError, match="unknown shape vgg; choose from transformer, mlp"):
        bench.BenchConfig(shapes="vgg")
    with pytest.raises(ValueError, match="repeats"):
        bench.BenchConfig(repeats=0)
    assert bench.BenchConfig(peers="").peers == ()


def test_resnet50_layout_matches_the_reference_architecture():
    info = models.describe(models.build_model("resnet50"))
    assert info == {
        "param_tensors": 161,
        "params": 25_557_032,
        "buffer_tensors": 159,
        "float_buffer_elements": 53_120,
    }
    t = models.describe(models.build_model("transformer", 0.05))
    assert t["param_tensors"] == 399


def test_bare_kernels_are_the_update_and_flattened_sees_flat_params():
    """The overhead probes subtract exactly the update's kernels (lerps and copies)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(8, 3))  # BN statistics and num_batches_tracked move
    ema, twin = polyak.EMA(model, 0.9), polyak.EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))
    ema.update()
    probes.bare_kernels(twin, 0.9)()
    ours, theirs = ema.averaged_tensors(), twin.averaged_tensors()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert theirs["1.num_batches_tracked"] == 2
    assert not probes.flattened(twin)
    assert probes.flattened(polyak.EMA(models.one_element_tensors(50), 0.9, flat_params=True))
