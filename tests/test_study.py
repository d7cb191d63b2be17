"""polyak study: the quick end-to-end run, its outputs, the table and report writers, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from polyak.cli import main
from polyak.cli.study.config import StudyConfig
from polyak.cli.study.report import format_table
from polyak.cli.study.run import run_study
from polyak.cli.study.summary import summarise_noise_level


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = StudyConfig(quick=True, out=str(out), progress=False, regression_splits=2, first_seed=1)
    return out, run_study(cfg)


def test_quick_run_writes_every_output(quick):
    out, results = quick
    for name in (
        "results.json",
        "report.md",
        "accuracy_per_epoch.png",
        "reliability.png",
        "seed_agreement.png",
        "regression.png",
        "posthoc.png",
    ):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["dataset"] == "digits" and saved["config"]["quick"] is True
    assert (
        saved["command"]
        == "polyak study --first-seed 1 --regression-splits 2 --out "
        + str(out)
        + " --quick --no-progress"
    )
    assert {"polyak", "torch", "numpy", "python"} <= set(saved["versions"])
    assert saved["machine"]["cores"] >= 1 and saved["machine"]["cpu"]
    assert [r["seed"] for r in saved["classification"]["runs"]["0.4"]] == [1, 2]
    assert saved["default_protocol"] is False
    assert saved["wall_time_s"] > 0
    summary = saved["classification"]["summary"]
    assert set(summary) == {"0.0", "0.4"}
    models = summary["0.4"]["models"]
    assert list(models) == [
        "live",
        "ema 0.99",
        "ema 0.999",
        "ema 0.9999",
        "ema 0.99 +bn",
        "ema 0.999 +bn",
        "ema 0.9999 +bn",
    ]
    for row in models.values():
        assert 0 < row["acc"]["mean"] <= 1 and row["nll"]["mean"] > 0
        assert len(row["final_acc_per_seed"]) == 2
    assert len(models["live"]["curve_mean"]) == 12
    assert 0 < models["live"]["memorised"]["mean"] <= 1
    assert models["live"]["memorised"]["mean"] == pytest.approx(
        sum(r["final"]["live"]["memorised"] for r in saved["classification"]["runs"]["0.4"]) / 2
    )
    assert math.isnan(
        results["classification"]["summary"]["0.0"]["models"]["live"]["memorised"]["mean"]
    )  # no flipped labels without noise
    reg = saved["regression"]["settings"]
    assert set(reg) == {"over-trained", "regularised"}
    assert all(len(s["rmse_live"]) == 2 for s in reg.values())


def test_averages_beat_live_weights_under_label_noise(quick):
    _, results = quick
    verdict = results["classification"]["summary"]["0.4"]["verdict"]
    assert verdict["final_acc_gain"] > 0.02, verdict
    assert verdict["seeds_won"] == verdict["seeds"]


def test_report_states_findings_and_caveats(quick):
    out, _ = quick
    report = (out / "report.md").read_text()
    assert "![accuracy_per_epoch.png](accuracy_per_epoch.png)" in report
    assert "Label noise 40%" in report and "C-MAPSS" in report and "NLL" in report
    assert "| live |" in report
    assert "## Against the goals" in report and "Not graded" in report
    assert "| wall time |" not in report  # --quick is not held to the default protocol's goals
    assert "chosen on the validation split" in report and "not across CPUs" in report
    assert "## Post-hoc EMA" in report and "![posthoc.png](posthoc.png)" in report
    assert "Post-hoc EMA, label noise 40%" in report and "sit on the curve" in report
    agreement = [line.split("|")[-2] for line in report.splitlines() if line.startswith("| ema")]
    assert agreement and all("±" not in cell for cell in agreement)  # two seeds: one pair


def test_the_average_is_chosen_on_validation_not_test():
    """The average with the best test accuracy loses to the one that is best on validation."""

    def run(seed: int, scores: dict[str, tuple[float, float, float]]) -> dict:
        final = {
            m: {"acc": t, "nll": 0.5, "ece": 0.1, "memorised": float("nan"), "val_acc": v,
                "val_nll": n}
            for m, (t, v, n) in scores.items()
        }  # fmt: skip
        curves = {m: {"test_acc": [0.5, t], "val_acc": [0.6, v]} for m, (t, v, _) in scores.items()}
        predictions = {m: np.arange(4) % (2 + seed) for m in scores}
        return {"final": final, "curves": curves, "predictions": predictions}

    # test accuracy favours "ema a", validation "ema b"; "ema c" ties b on accuracy, worse NLL
    scores = {
        "live": (0.80, 0.70, 0.9),
        "ema a": (0.90, 0.71, 0.8),
        "ema b": (0.85, 0.75, 0.6),
        "ema c": (0.95, 0.75, 0.7),
    }
    verdict = summarise_noise_level([run(0, scores), run(1, scores)])["verdict"]
    assert verdict["chosen_on"] == "validation"
    assert verdict["best_average"] == "ema b"
    assert verdict["final_acc_gain"] == pytest.approx(0.05)
    assert verdict["best_epoch_average"] == "ema b"  # c ties b at the best epoch: the first wins


def test_quick_honours_an_explicit_dataset_and_keeps_explicit_sizes():
    assert StudyConfig(quick=True).resolved().dataset == "digits"
    assert StudyConfig(quick=True, dataset="fashion-mnist").resolved().dataset == "fashion-mnist"
    assert StudyConfig(quick=True, data_dir="/data").resolved().dataset == "fashion-mnist"
    quick = StudyConfig(quick=True, epochs=3).resolved()
    assert (quick.epochs, quick.seeds) == (3, 2)
    assert StudyConfig().resolved().is_default_protocol()
    assert StudyConfig(out="elsewhere", first_seed=7, workers=1).resolved().is_default_protocol()
    assert not StudyConfig(epochs=14).resolved().is_default_protocol()
    with pytest.raises(ValueError, match="auto, fashion-mnist, digits$"):
        StudyConfig(dataset="diabetes").resolved()


def test_table_marks_the_winner_of_each_column():
    stat = lambda m: {"mean": m, "std": 0.0}  # noqa: E731
    summary = {
        "0.4": {
            "models": {
                "live": {
                    k: stat(v)
                    for k, v in dict(
                        acc=0.7, nll=1.0, ece=0.1, memorised=0.9, agreement=0.8
                    ).items()
                },
                "ema 0.99": {
                    k: stat(v)
                    for k, v in dict(
                        acc=0.8, nll=0.9, ece=0.2, memorised=0.3, agreement=0.9
                    ).items()
                },
            }
        }
    }
    text = format_table(summary)
    live = next(line for line in text.splitlines() if line.startswith("live"))
    ema = next(line for line in text.splitlines() if line.startswith("ema 0.99"))
    assert "70.0 ± 0.0 " in live and "80.0 ± 0.0 *" in ema and "10.0 ± 0.0 *" in live
    assert "—" in live  # no best-epoch column for this row


def test_cli_help_and_bad_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0
    assert "--noise" in capsys.readouterr().out
    with pytest.raises(ValueError, match="decays"):
        StudyConfig(decays=(1.5,)).resolved()
    with pytest.raises(ValueError, match="model"):
        StudyConfig(model="resnet").resolved()


@pytest.mark.parametrize("flag", [["--lr", "inf"], ["--lr", "nan"], ["--noise", "0", "inf"]])
def test_non_finite_flags_are_one_line_errors(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", *flag])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must be a finite number" in err


def test_a_learning_rate_that_diverges_is_a_one_line_error(tmp_path, capsys):
    code = main(["study", "--quick", "--dataset", "digits", "--no-posthoc", "--lr", "1e6",
                 "--workers", "1", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("polyak study: error: training diverged: the loss of the mlp")
    assert "lower --lr (it is 1e+06)" in err[-1] and not any("Traceback" in x for x in err)


def test_wall_time_is_reported_not_graded():
    from polyak.cli.study.report import provenance, targets

    results = {"classification": {"summary": {}}, "wall_time_s": 500.0}
    assert targets(results) == []  # a slow, busy machine fails no goal
    results.update(
        config={"workers": 2, "threads": 1},
        machine={"cpu": "some CPU", "cores": 2, "load": [3.5, 2.0, 1.0]},
        versions={"torch": "2.13.0"},
        command="polyak study",
    )
    line = provenance(results)[0]
    assert "Wall time: 500 s, load average 3.50/2.00/1.00" in line and "not graded" in line
