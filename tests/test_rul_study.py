"""``polyak study --task rul`` end to end on synthetic C-MAPSS files: training, selection on the
validation units, the summary, the report and the command line's one-line errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from polyak.cli import main
from polyak.cli.study.cmapss import load_cmapss, write_synthetic_cmapss
from polyak.cli.study.config import StudyConfig
from polyak.cli.study.rul import COURSE, LIVE, summarise_rul, train_rul_seed
from polyak.cli.study.rul_prep import prepare_rul
from polyak.cli.study.rul_report import claim_verdict

NASA = "Turbofan Engine Degradation Simulation Data Set"
FAST = ["--epochs", "8", "--patience", "3", "--batch-size", "32", "--seeds", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cmapss")
    write_synthetic_cmapss(folder, "FD001", train_units=20, test_units=30, cycles=(60, 140),
                           seed=1)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rul-out")
    argv = ["study", "--task", "rul", "--data-dir", str(data_dir), "--out", str(out), *FAST]
    assert main([*argv, "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_the_run_writes_every_output(study, data_dir):
    out, results = study
    for name in ("results.json", "report.md", "predictions.png", "rmse_per_epoch.png"):
        assert (out / name).stat().st_size > 0, name
    cfg = results["config"]
    assert (cfg["task"], cfg["subset"], cfg["epochs"], cfg["seeds"], cfg["lr"]) == (
        "rul", "FD001", 8, 2, 1e-3)  # fmt: skip
    command = results["command"]
    assert command.startswith("polyak study --task rul ") and f"--data-dir {data_dir}" in command
    assert "--seeds 2" in command and results["default_protocol"] is False
    assert results["machine"]["cpu"] and results["wall_time_s"] > 0
    ds = results["dataset"]
    assert ds["name"] == "synthetic FD001 (C-MAPSS format)"
    assert ds["test_units"] == len(ds["test_rul"]) == 30 and len(ds["sensors"]) == 14
    assert ds["train_units"] + ds["val_units"] == 20


def test_each_epoch_is_chosen_on_validation_and_scored_on_test(study):
    _, results = study
    rul, patience = results["rul"], results["config"]["patience"]
    summary = rul["summary"]
    assert set(summary["candidates"]) == {LIVE, COURSE, "warmup 0.999", "power 0.10"}
    for run in rul["runs"]:
        for name, chosen in run["chosen"].items():
            val, test = run["curves"][name]["val_rmse"], run["curves"][name]["test_rmse"]
            assert chosen["epoch"] == int(np.argmin(val)) + 1  # the first best validation epoch
            assert chosen["test_rmse"] == pytest.approx(test[chosen["epoch"] - 1])
            assert len(chosen["predictions"]) == 30
        # stopped once every candidate went `patience` epochs without improving (or at the end)
        last = max(c["epoch"] for c in run["chosen"].values())
        assert run["epochs_run"] == min(results["config"]["epochs"], last + patience)
    for name, row in summary["candidates"].items():
        if name == LIVE:
            continue
        change = [r["chosen"][name]["test_rmse"] / r["chosen"][LIVE]["test_rmse"] - 1
                  for r in rul["runs"]]  # fmt: skip
        assert row["relative_change"]["mean"] == pytest.approx(np.mean(change))
        assert row["seeds_lower"] == sum(c < 0 for c in change)
    averages = [c for c in summary["candidates"] if c != LIVE]
    vals = {c: summary["candidates"][c]["val_rmse"]["mean"] for c in averages}
    assert summary["chosen_average"] == min(vals, key=vals.get)


def test_the_model_beats_predicting_the_mean(study):
    _, results = study
    summary = results["rul"]["summary"]
    for name in (LIVE, summary["chosen_average"]):
        assert summary["candidates"][name]["test_rmse"]["mean"] < 0.9 * summary["baseline_rmse"]


def test_the_report_holds_the_claim_against_the_measurement(study):
    out, results = study
    report = (out / "report.md").read_text()
    assert "![predictions.png](predictions.png)" in report and "| live |" in report
    assert "typically reduces RMSE by 2–5%" in report and "no published source" in report
    assert "chosen on the validation units" in report and "Reproduce with `polyak study" in report
    course = results["rul"]["summary"]["candidates"][COURSE]["relative_change"]
    assert claim_verdict(course, 2) in report


def test_claim_verdicts():
    assert claim_verdict({"mean": 0.01, "std": 0.0}, 5).startswith("no reduction")
    assert claim_verdict({"mean": -0.01, "std": 0.0}, 5).startswith("a smaller reduction")
    assert claim_verdict({"mean": -0.08, "std": 0.0}, 5).startswith("a larger reduction")
    assert claim_verdict({"mean": -0.03, "std": 0.04}, 5) == (
        "within the claimed 2–5% reduction, but within seed noise (standard error 2.0% over 5 "
        "seeds)"
    )


def test_the_average_is_chosen_on_validation_not_test(data_dir):
    data = prepare_rul(load_cmapss(data_dir))

    def run(scores: dict[str, tuple[float, float]]) -> dict:
        return {"seconds_per_epoch": 0.1, "chosen": {
            c: {"epoch": 1, "val_rmse": v, "test_rmse": t, "test_rmse_capped": t, "score": 1.0}
            for c, (v, t) in scores.items()}}  # fmt: skip

    # the test set favours "a", the validation units "b"
    scores = {LIVE: (10.0, 20.0), "a": (9.0, 15.0), "b": (8.0, 19.0)}
    summary = summarise_rul([run(scores), run(scores)], data)
    assert summary["chosen_average"] == "b" and summary["chosen_on"] == "validation"
    assert summary["candidates"]["b"]["relative_change"]["mean"] == pytest.approx(-0.05)


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--task", "rul"], f"--task rul needs --data-dir DIR: put train_FD001.txt, "
                            f"test_FD001.txt and RUL_FD001.txt from NASA's prognostics data "
                            f'repository, "{NASA}"'),
        (["--task", "rul", "--data-dir", "/nonexistent", "--subset", "fd003"],
         "C-MAPSS directory /nonexistent does not exist; put train_FD003.txt"),
        (["--task", "rul", "--data-dir", "DATA", "--subset", "FD002"],
         "lacks train_FD002.txt, test_FD002.txt, RUL_FD002.txt; put train_FD002.txt"),
        (["--task", "rul", "--data-dir", "DATA", "--subset", "FD5"], "unknown --subset 'FD5'"),
        (["--task", "rul", "--data-dir", "DATA", "--noise", "0.2"],
         "--noise does not apply to --task rul"),
        (["--task", "rul", "--data-dir", "DATA", "--model", "mlp"],
         "--model does not apply to --task rul"),  # given, though equal to the default
        (["--task", "rul", "--data-dir", "DATA", "--patience", "0"], "--patience must be >= 1"),
        (["--task", "survival"], "unknown task 'survival'; choose from default, rul"),
        (["--subset", "FD001"], "--subset is for --task rul"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_and_exit_2(argv, words, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(data_dir) if a == "DATA" else a for a in argv]
    code, err = _run(["study", *argv, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("polyak study: error: ") and words in err, err
    assert not out.exists()  # found before any work


def test_a_malformed_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    paths = write_synthetic_cmapss(tmp_path, "FD001", train_units=3, test_units=2, cycles=(20, 30))
    lines = paths["test"].read_text().splitlines()
    lines[4] = lines[4].replace(" ", "  x ", 1)
    paths["test"].write_text("\n".join(lines))
    code, err = _run(["study", "--task", "rul", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{paths['test']}, line 5: 27 columns, expected 26" in err


def test_rul_defaults_keep_what_is_given():
    base = {"task": "rul", "data_dir": "/data"}
    cfg = StudyConfig(**base).resolved()
    assert (cfg.epochs, cfg.seeds, cfg.batch_size, cfg.lr, cfg.val_fraction) == (
        60, 5, 256, 1e-3, 0.2)  # fmt: skip
    # --seeds 3 equals the study's default: given on purpose, it is kept
    assert StudyConfig(**base, seeds=3, given=("seeds",)).resolved().seeds == 3
    quick = StudyConfig(**base, quick=True, epochs=4).resolved()
    assert (quick.epochs, quick.seeds, quick.patience) == (4, 2, 3)
    assert not StudyConfig(**base).resolved().is_default_protocol()
    # the default task is untouched, and --quick now keeps an explicit default value too
    assert StudyConfig().resolved() == StudyConfig(task="default").resolved()
    assert StudyConfig(quick=True, epochs=15, given=("epochs",)).resolved().epochs == 15
    assert StudyConfig(quick=True).resolved().epochs == 12


def test_a_diverged_run_is_reported_not_a_crash(data_dir):
    """Non-finite inputs make every candidate's RMSE NaN: the run still ends with a record."""
    data = prepare_rul(load_cmapss(data_dir))
    bad = dataclasses.replace(data, x_train=np.full_like(data.x_train, np.nan))
    with pytest.warns(UserWarning, match="holds inf/nan"):
        run = train_rul_seed(bad, 0, epochs=3, batch_size=256, lr=1e-3, patience=1)
    assert run["epochs_run"] == 1  # no candidate ever improved
    assert all(np.isnan(c["test_rmse"]) and c["epoch"] == 1 for c in run["chosen"].values())
