"""The study's "merge instead of decay" section: the forked runs, the merges through polyak.merge,
the choice on validation, the pre-registered expectation and its verdict."""

from __future__ import annotations

import pytest

from polyak.cli.study.merge_decay import EXPECTATION, merge_run, summarise_merge
from polyak.cli.study.merge_report import merge_findings, merge_section


@pytest.fixture(scope="module")
def runs():
    from polyak.cli.study.classify import make_split
    from polyak.cli.study.config import StudyConfig
    from polyak.cli.study.data import resolve_dataset

    cfg = StudyConfig(dataset="digits", epochs=2, progress=False).resolved()
    data, _ = resolve_dataset("digits", None, seed=0)
    split = make_split(data, 0.0, cfg.val_fraction)
    return [merge_run(cfg, split, seed) for seed in (0, 1)]


def test_each_seed_scores_the_decayed_run_and_every_merge(runs):
    names = ["decayed run", "constant run", "WSM (linear decay)", "LAWA (window)",
             "LAWA (half window)", "EMA 0.98", "EMA 0.99", "EMA 0.995"]  # fmt: skip
    for r in runs:
        assert list(r["scores"]) == names
        assert all(0 <= s["acc"] <= 1 and 0 <= s["val_acc"] <= 1 for s in r["scores"].values())
        assert r["window"] == round(0.2 * r["steps"]) and r["checkpoints"] >= 3
        fits = [r["scores"][f"EMA {d}"]["fit"] for d in ("0.98", "0.99", "0.995")]
        assert all(0 <= f < 0.5 for f in fits)
    assert runs[0]["scores"] != runs[1]["scores"]  # seeds differ


def test_the_choice_is_made_on_validation_and_the_verdict_follows_the_gaps(runs):
    m = summarise_merge(runs)
    merges = [n for n in m["table"] if n not in ("decayed run", "constant run")]
    best = max(m["table"][n]["val_acc"]["mean"] for n in merges)
    assert m["table"][m["chosen"]]["val_acc"]["mean"] == best
    decayed = [r["scores"]["decayed run"]["acc"] for r in runs]
    chosen = [r["scores"][m["chosen"]]["acc"] for r in runs]
    assert m["gaps_points"] == pytest.approx([(c - d) * 100 for c, d in zip(chosen, decayed)])
    assert m["seeds_within"] == sum(g >= -0.5 for g in m["gaps_points"])
    fake = {**m, "gaps_points": [-0.6, 0.2, -0.4], "seeds_within": 2, "seeds": 3, "met": True}
    results = {"merge": {"noise": 0.0, **fake}}
    section = "\n".join(merge_section(results))
    assert EXPECTATION in section and "## Merge instead of decay" in section
    assert "on 2 of 3 seeds" in section and "the expectation was met" in section
    assert all(f"| {n}" in section for n in m["table"])
    (line,) = merge_findings(results)
    assert line.startswith("- **Merge instead of decay.** The merge chosen on validation, `")
    assert merge_section({"merge": None}) == [] and merge_findings({}) == []


def test_no_merge_is_a_flag_of_the_study():
    import argparse

    from polyak.cli.study.config import StudyConfig, add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--no-merge"])).merge is False
    assert StudyConfig().merge is True
    with pytest.raises(ValueError, match="--merge does not apply to --task rul"):
        StudyConfig(task="rul", merge=False, data_dir="/x").resolved()
