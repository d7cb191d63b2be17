"""polyak study's methods section: BEMA, SWAG and write-back rows, chosen on validation, with
the expectations written before running; --no-methods leaves them out."""

from __future__ import annotations

import json

import pytest

from polyak.cli.study.config import StudyConfig
from polyak.cli.study.methods import BEMAS, SCALES, WRITE_BACKS
from polyak.cli.study.methods_report import EXPECTED, summarise_methods
from polyak.cli.study.run import run_study


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("study-methods")
    cfg = StudyConfig(quick=True, epochs=4, seeds=2, regression=False, posthoc=False,
                      out=str(out), progress=False)  # fmt: skip
    return out, run_study(cfg)


@pytest.mark.slow
def test_the_report_has_the_rows_the_expectations_and_the_outcomes(small):
    out, _ = small
    report = (out / "report.md").read_text()
    assert "## Beyond the plain EMA: BEMA, SWAG, write-back" in report
    for text in EXPECTED.values():
        assert text in report
    saved = json.loads((out / "results.json").read_text())
    for noise in ("0.0", "0.4"):
        level = saved["methods"][noise]
        assert set(level["variants"]["bema"]) == set(BEMAS)
        assert set(level["variants"]["write-back"]) == set(WRITE_BACKS)
        assert set(level["chosen"]) == {"bema", "swag", "write-back"}
        assert {r.split(" (")[0] for r in level["rows"]} == {
            "live", "plain EMA", "BEMA", "SWA mean", "SWAG", "write-back"
        }  # fmt: skip
        assert len(level["distance"][level["chosen"]["bema"]]) == 4  # one per epoch
    assert report.count("noise 0%, BEMA") == 1 and report.count("noise 40%, SWAG") == 1


@pytest.mark.slow
def test_no_methods_leaves_them_out(tmp_path):
    cfg = StudyConfig(quick=True, epochs=2, seeds=2, noise=(0.0,), regression=False,
                      posthoc=False, methods=False, out=str(tmp_path), progress=False)  # fmt: skip
    results = run_study(cfg)
    assert results["methods"] is None
    assert "Beyond the plain EMA" not in (tmp_path / "report.md").read_text()


def _scores(val_acc, acc, val_nll=0.5, nll=0.5):
    return {"acc": acc, "nll": nll, "ece": 0.1, "val_acc": val_acc, "val_nll": val_nll}


def test_every_choice_is_made_on_validation_not_test():
    bema = {"bema": _scores(0.9, 0.5), "bema k=0.8": _scores(0.8, 0.99)}
    swag = {
        f"swag {s:g}": _scores(0.8, 0.8, val_nll=v, nll=1 - v) for s, v in zip(SCALES, (0.3, 0.6))
    }
    distance = {"bema": [0.1] * 3, "bema k=0.8": [0.2] * 3, "ema 0.99": [0.3] * 3}
    extra = {"swa mean": _scores(0.8, 0.8), "collected": 9, "distance": distance}
    run = {"methods": {**bema, **swag, **extra}}
    wb = [
        {"variant": WRITE_BACKS[0], "final": _scores(0.7, 0.9)},
        {"variant": WRITE_BACKS[1], "final": _scores(0.75, 0.1)},
    ]
    row = {k: {"mean": 0.5, "std": 0.0} for k in ("acc", "nll", "ece", "val_acc", "val_nll")}
    level = {"models": {"live": row, "ema 0.99": row}, "verdict": {"best_average": "ema 0.99"}}
    s = summarise_methods([run, run], wb, level)
    assert s["chosen"] == {
        "bema": "bema",
        "swag": f"swag {SCALES[0]:g}",
        "write-back": WRITE_BACKS[1],
    }
    assert s["early"] == {"bema": pytest.approx(0.1), "plain": pytest.approx(0.3),
                          "plain_name": "ema 0.99"}  # fmt: skip
