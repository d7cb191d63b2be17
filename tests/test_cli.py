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
}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = int(e.code or 0)
    return code, capsys.readouterr().err


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
    for command in ("study", "bench"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "--debug" in text
        flags = [w for w in text.split() if w.startswith("--")]
        assert len(flags) > 10
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
