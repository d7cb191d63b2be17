"""The ``polyak`` command line: every user error is one line on stderr and exit status 2, found
before any work starts; ``--debug`` shows the traceback; ``python -m polyak`` is the same command;
without torch it says how to install it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from polyak.cli import main

USER_ERRORS = {
    "negative epochs": (["study", "--epochs", "-3"], "--epochs must be >= 1, got -3"),
    "noise above 0.9": (["study", "--noise", "1.5"], "--noise values must be distinct and in"),
    "unknown model": (["study", "--model", "resnet"], "unknown model 'resnet'; choose from mlp"),
    "unknown dataset": (["study", "--dataset", "mnist"], "choose from auto, fashion-mnist, digits"),
    "regression dataset": (["study", "--dataset", "diabetes"], "a regression set"),
    "missing data dir": (
        ["study", "--data-dir", "/nonexistent", "--dataset", "fashion-mnist"],
        "Fashion-MNIST directory /nonexistent does not exist",
    ),
    "quick keeps an explicit data dir": (
        ["study", "--quick", "--data-dir", "/nonexistent"],
        "/nonexistent does not exist",
    ),
    "digits with a data dir": (
        ["study", "--dataset", "digits", "--data-dir", "/tmp"],
        "--data-dir is for fashion-mnist",
    ),
    "out under /proc": (["study", "--out", "/proc/x"], "--out /proc/x: cannot create"),
    "not a number": (["study", "--epochs", "many"], "argument --epochs: invalid int value"),
    "unknown flag": (["study", "--epoch", "3"], "unrecognized arguments: --epoch 3"),
    "no command": ([], "the following arguments are required"),
    "unknown shape": (
        ["bench", "--shapes", "nosuchshape"],
        "unknown shape nosuchshape; choose from transformer, mlp, resnet50, transformer-bf16",
    ),
    "unknown peer": (["bench", "--peers", "timm-V4"], "unknown peer timm-V4; choose from"),
    "bad decay": (["bench", "--decay", "1.5"], "decay must be in (0, 1), got 1.5"),
    "bench out under /proc": (["bench", "--output-dir", "/proc/x"], "--output-dir /proc/x"),
    "posthoc: not a store": (
        ["posthoc", "/nonexistent", "--list"],
        "/nonexistent holds no manifest",
    ),
    "posthoc: no target": (
        ["posthoc", "/nonexistent", "--out", "o"],
        "give the averages to reconstruct (--sigma-rel S ..., --decay D ...)",
    ),
    "posthoc: no --out": (["posthoc", "d", "--decay", "0.9"], "give the output directory: --out"),
    "posthoc: --list with targets": (
        ["posthoc", "d", "--list", "--sigma-rel", "0.1", "--out", "o"],
        "--list shows the store; it takes no --sigma-rel/--decay, --out",
    ),
    "posthoc: --verify alone": (["posthoc", "d", "--verify"], "--verify goes with --list"),
    "posthoc: not a number": (["posthoc", "d", "--sigma-rel", "x"], "invalid float value: 'x'"),
    "posthoc: no directory": (["posthoc", "--list"], "the following arguments are required: DIR"),
}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code, _, err = run_out(argv, capsys)
    return code, err


def run_out(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``polyak argv``."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str, fragment: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and err.startswith("polyak"), err
    assert fragment in err, err


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_are_one_line_and_exit_2(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out would be made here, never in the repository
    argv, fragment = USER_ERRORS[case]
    code, err = run(argv, capsys)
    assert code == 2
    assert_one_line(err, fragment)
    assert not list(tmp_path.iterdir())  # nothing was written before the error


def test_output_paths_that_are_files_and_corrupt_data(capsys, tmp_path):
    file = tmp_path / "results"
    file.write_text("not a directory")
    code, err = run(["study", "--out", str(file)], capsys)
    assert code == 2
    assert_one_line(err, f"--out {file} is a file, not a directory")
    code, err = run(["bench", "--quick", "--output-dir", str(file)], capsys)
    assert code == 2
    assert_one_line(err, f"--output-dir {file} is a file")
    data = tmp_path / "fm"
    data.mkdir()
    for stem in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        kind = "idx3" if "images" in stem else "idx1"
        (data / f"{stem}-{kind}-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    code, err = run(["study", "--data-dir", str(data), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert_one_line(err, "truncated")


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        main(["study", "--epochs", "-3", "--debug"])
    with pytest.raises(ValueError, match="unknown shape"):
        main(["--debug", "bench", "--shapes", "nosuchshape"])


def test_help_describes_every_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside names like transformer-bf16
    for command, count in (("posthoc", 7), ("study", 10), ("bench", 10)):  # bench: last
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "--debug" in text
        flags = [w for w in text.split() if w.startswith("--")]
        assert len(flags) > count
    for fragment in (
        "transformer-bf16",
        "timm-V3",
        "ema-pytorch-foreach",
        "default: 25",
        "15 s on 2 idle cores",
    ):
        assert fragment in " ".join(text.split()), fragment


def test_python_m_polyak_is_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "polyak", "study", "--noise", "1.5"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("polyak study: error: --noise") and done.stderr.count("\n") == 1


def test_without_torch_the_command_and_the_api_say_how_to_install_it(tmp_path):
    code = f"""
import sys
sys.modules["torch"] = None  # as if torch were not installed
import polyak
import numpy as np
print(polyak.ema_update(np.zeros(2), np.ones(2), 0.5))
try:
    polyak.EMA
except ImportError as e:
    print("EMA:", e)
from polyak.cli import main
print("study:", main(["study", "--quick", "--out", {str(tmp_path / "o")!r}]))
print("bench:", main(["bench", "--quick", "--no-save"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "[0.5 0.5]"
    assert out[1].startswith("EMA: ") and 'pip install "polyak[torch]"' in out[1]
    assert out[2:] == ["study: 2", "bench: 2"]
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all('pip install "polyak[torch]"' in line for line in lines)
    assert lines[0].startswith("polyak study: error: torch is not installed")
    assert "Traceback" not in done.stderr
    assert not Path(tmp_path / "o").exists()


# ---------------------------------------------------------------- polyak posthoc
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A post-hoc store: 30 steps of a small model, a float32 snapshot every 10."""
    import torch

    import polyak
    from posthoc_helpers import set_weights, small_model

    directory = tmp_path_factory.mktemp("store")
    model = small_model()
    ph = polyak.PostHocEMA(model, directory, snapshot_every=10, snapshot_dtype=torch.float32)
    for step in range(1, 31):
        set_weights(model, step)
        ph.update()
    ph.close()
    return directory


POSTHOC_ERRORS = {
    "sigma_rel out of range": (["--sigma-rel", "0.5"], "--sigma-rel 0.5: sigma_rel must be in (0,"),
    "decay of 1": (["--decay", "1"], "--decay 1.0: decay must be in (0, 1), got 1.0"),
    "repeated target": (["--sigma-rel", "0.1", "0.1"], "--sigma-rel values must be distinct"),
    "step 0": (["--sigma-rel", "0.1", "--step", "0"], "--step must be >= 1, got 0"),
    "step before the first snapshot": (
        ["--sigma-rel", "0.1", "--step", "5"],
        "no snapshot at or before step 5 (the first is 10)",
    ),
    "step after the last snapshot": (
        ["--sigma-rel", "0.1", "--step", "35"],
        "step 35 is after the last snapshot: ",
    ),
    "out under /proc": (["--sigma-rel", "0.1", "--out", "/proc/x"], "--out /proc/x: cannot create"),
    "list with a step": (["--list", "--step", "10"], "--list shows the store; it takes no --step"),
}


@pytest.mark.parametrize("case", list(POSTHOC_ERRORS))
def test_posthoc_user_errors_are_one_line_and_exit_2(case, store, capsys, tmp_path):
    flags, fragment = POSTHOC_ERRORS[case]
    out = ["--out", str(tmp_path / "out")] if "--out" not in flags and "--list" not in flags else []
    code, err = run(["posthoc", str(store), *flags, *out], capsys)
    assert code == 2
    assert_one_line(err, fragment)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_posthoc_writes_one_file_per_target_and_the_profiles(store, capsys, tmp_path):
    import torch
    from safetensors import safe_open

    import polyak

    out = tmp_path / "out"
    argv = ["posthoc", str(store), "--sigma-rel", "0.05", "0.12", "--decay", "0.9", "--out"]
    code, err = run([*argv, str(out)], capsys)
    # decay=0.9 over 30 steps is wider than either average kept: warned, one line
    assert code == 0 and err.startswith("polyak posthoc: warning: decay=0.9: the snapshots fit")
    assert "keep a wider one too" in err and len(err.splitlines()) == 1
    names = ["sigma_rel=0.05", "sigma_rel=0.12", "decay=0.9"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{n}.safetensors" for n in names), "weight_profiles.png"]
    )
    expected = polyak.posthoc.reconstruct_many(store, [0.05, 0.12], decays=[0.9])
    assert list(expected) == names  # keyed by target
    for name, rec in expected.items():
        with safe_open(out / f"{name}.safetensors", "pt") as f:
            assert f.metadata()["target"] == name and f.metadata()["step"] == "30"
            assert float(f.metadata()["fit"]) == pytest.approx(rec.fit, rel=1e-5)
            assert sorted(f.keys()) == sorted(rec)
            for k in rec:
                assert torch.equal(f.get_tensor(k), rec[k]), (name, k)
    png = (out / "weight_profiles.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # an earlier step uses the snapshots up to it; --no-plot writes the tensors only
    code, printed, _ = run_out(
        [*argv[:3], "0.08", "--step", "20", "--no-plot", "--out", str(tmp_path)], capsys
    )
    assert code == 0 and not (tmp_path / "weight_profiles.png").exists()
    with safe_open(tmp_path / "sigma_rel=0.08.safetensors", "pt") as f:
        assert f.metadata()["step"] == "20"
    assert "reconstructed at step 20" in printed


def _two_targets(store):
    return ["posthoc", str(store), "--sigma-rel", "0.05", "0.1", "--out"]


def _posthoc_outputs(out):
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_posthoc_a_full_disk_is_one_line_and_replaces_nothing(store, capsys, tmp_path, monkeypatch):
    """ENOSPC while writing the second file: exit 2, one line, the earlier output as it was,
    no temporary file left (every output is complete before any replaces an earlier one)."""
    import safetensors.torch

    out = tmp_path / "out"
    out.mkdir()
    (out / "sigma_rel=0.05.safetensors").write_bytes(b"an earlier output")
    calls = []
    original = safetensors.torch.save_file

    def failing(*a, **k):
        calls.append(a[1])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    code, err = run([*_two_targets(store), str(out)], capsys)
    assert code == 2 and len(calls) == 2
    assert_one_line(err, "No space left on device")
    assert "nothing was replaced" in err and "Traceback" not in err
    assert _posthoc_outputs(out) == {"sigma_rel=0.05.safetensors": b"an earlier output"}
    with pytest.raises(OSError, match="No space left"):  # --debug: the traceback
        calls.clear()
        main(["posthoc", str(store), "--sigma-rel", "0.05", "0.1", "--out", str(out), "--debug"])
    assert _posthoc_outputs(out) == {"sigma_rel=0.05.safetensors": b"an earlier output"}


def test_posthoc_a_rename_failing_midway_puts_every_output_back(
    store, capsys, tmp_path, monkeypatch
):
    """The commit itself fails after the first output replaced its earlier version: that one
    is put back, the rest untouched, no temporary file left."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    before = {f"sigma_rel={s}.safetensors": f"old {s}".encode() for s in (0.05, 0.1)}
    before["weight_profiles.png"] = b"old png"
    for name, data in before.items():
        (out / name).write_bytes(data)
    real, renamed = os.replace, []

    def failing(src, dst):
        new = Path(dst).name == "sigma_rel=0.1.safetensors" and Path(src).suffix == ".tmp"
        if new and "failed" not in renamed:  # the new output's rename, once
            renamed.append("failed")
            raise OSError(28, "No space left on device")
        renamed.append(Path(dst).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    code, err = run([*_two_targets(store), str(out)], capsys)
    assert "sigma_rel=0.05.safetensors" in renamed  # the failure came midway
    assert code == 2
    assert_one_line(err, "No space left on device")
    assert _posthoc_outputs(out) == before


def test_posthoc_an_output_that_cannot_be_replaced_is_one_line(store, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sigma_rel=0.05.safetensors").write_bytes(b"an earlier output")
    (out / "sigma_rel=0.1.safetensors").mkdir()  # not a file: it cannot be replaced
    code, err = run([*_two_targets(store), str(out)], capsys)
    assert code == 2
    assert_one_line(err, "sigma_rel=0.1.safetensors")
    assert sorted(p.name for p in out.iterdir()) == [
        "sigma_rel=0.05.safetensors",
        "sigma_rel=0.1.safetensors",
    ]
    assert (out / "sigma_rel=0.05.safetensors").read_bytes() == b"an earlier output"


def test_posthoc_list_verify_and_a_corrupt_file(store, capsys, tmp_path):
    import json
    import shutil

    import polyak

    code, printed, err = run_out(["posthoc", str(store), "--list", "--verify"], capsys)
    assert code == 0 and err == ""
    assert "3 snapshot(s)" in printed and printed.count(" ok") == 3
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    snap = json.loads((broken / "manifest.json").read_text())["snapshots"][1]
    bad = broken / snap["files"]["sigma0.1"]["name"]
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    code, printed, _ = run_out(["posthoc", str(broken), "--list", "--verify"], capsys)
    assert code == 1 and "CRC-32" in printed
    out = tmp_path / "out"
    code, err = run(["posthoc", str(broken), "--sigma-rel", "0.1", "--out", str(out)], capsys)
    assert code == 2
    assert_one_line(err, f"snapshot file {bad} (step 20) is corrupt: CRC-32")
    assert list(out.iterdir()) == []
    with pytest.raises(polyak.posthoc.ChecksumError):
        main(["posthoc", str(broken), "--sigma-rel", "0.1", "--out", str(out), "--debug"])


def test_posthoc_list_verify_of_a_manifest_naming_dev_zero_is_one_line(store, capsys, tmp_path):
    """On main, --list --verify read /dev/zero for ever."""
    import json
    import shutil

    crafted = tmp_path / "crafted"
    shutil.copytree(store, crafted)
    manifest = json.loads((crafted / "manifest.json").read_text())
    manifest["snapshots"][0]["files"]["sigma0.1"]["name"] = "/dev/zero"
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    code, err = run(["posthoc", str(crafted), "--list", "--verify"], capsys)
    assert code == 2
    assert_one_line(err, "snapshots[0].files.sigma0.1.name '/dev/zero' is not the store's own")


def test_posthoc_warnings_are_one_line_each(tmp_path, capsys):
    """float16 snapshots and a target far narrower than the stored averages: the magnified
    rounding is one line on stderr, the run goes on."""
    import torch

    import polyak

    model = torch.nn.Linear(3, 2)
    ph = polyak.PostHocEMA(model, tmp_path / "s", snapshot_every=10)  # float16 files
    for _ in range(40):
        ph.update()
    ph.close()
    (tmp_path / "s" / "stray.pt").write_bytes(b"another tool's checkpoint")
    code, err = run(
        ["posthoc", str(tmp_path / "s"), "--sigma-rel", "0.01", "--no-plot", "--out",
         str(tmp_path / "o")], capsys,
    )  # fmt: skip
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 3 and all(x.startswith("polyak posthoc: warning: ") for x in lines)
    assert any("ignoring 1 file(s)" in x and "stray.pt" in x for x in lines)
    assert any("sigma_rel=0.01: the snapshots' coefficients add up to" in x for x in lines)
    assert any("sigma_rel=0.01: the snapshots fit its weight profile only to" in x for x in lines)


def test_python_m_polyak_posthoc(store):
    done = subprocess.run(
        [sys.executable, "-m", "polyak", "posthoc", str(store), "--list"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith(f"store {store}: run ")
