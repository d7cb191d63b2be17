"""The study's post-hoc section: it changes no other number of a run, the averages kept directly
sit on the reconstructed curve, and sigma_rel is chosen on the validation split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from polyak.cli.study.classify import make_split, train_run
from polyak.cli.study.config import StudyConfig
from polyak.cli.study.data import resolve_dataset
from polyak.cli.study.posthoc_sweep import KEPT, SIGMA_RELS, equivalent_sigma_rel, summarise_posthoc


def _same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=True), path
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path


def test_the_section_changes_no_other_number_and_the_kept_averages_sit_on_the_curve():
    cfg = StudyConfig(quick=True, epochs=2, decays=(0.8, 0.99), progress=False).resolved()
    data, _ = resolve_dataset("digits", None, seed=0)
    split = make_split(data, 0.4, cfg.val_fraction)
    with_sweep = train_run(cfg, split, 0)
    without = train_run(dataclasses.replace(cfg, posthoc=False), split, 0)
    sweep = with_sweep.pop("posthoc")
    assert "posthoc" not in without
    _same(with_sweep, without)  # bit for bit
    assert len(sweep["curve"]) == len(SIGMA_RELS)
    for rel in KEPT:
        kept, curve = sweep["kept"][str(rel)], sweep["curve"][SIGMA_RELS.index(rel)]
        assert kept["weights_rel_diff"] < 1e-6
        assert kept["acc"] == curve["acc"] and kept["nll"] == pytest.approx(curve["nll"], abs=1e-6)
    # a constant-decay average kept directly scores as its reconstruction where the snapshots
    # fit its profile well (decay 0.8 over 2 epochs of 11 steps: fit 1.5e-2; 0.99 is nearly
    # uniform over 22 steps, fitted to ~25%)
    good, poor = sweep["decays"]["ema 0.8"], sweep["decays"]["ema 0.99"]
    assert good["reconstructed"]["fit"] < 0.03 < 0.1 < poor["reconstructed"]["fit"]
    assert good["reconstructed"]["acc"] == pytest.approx(good["kept"]["acc"], abs=0.01)
    assert good["reconstructed"]["nll"] == pytest.approx(good["kept"]["nll"], rel=0.01)
    per_epoch = -(-len(split.x_train) // cfg.batch_size)
    every, steps = per_epoch // 2, 2 * per_epoch
    assert (sweep["snapshot_every"], sweep["steps"]) == (every, steps)
    assert sweep["snapshots"] == steps // every + (steps % every > 0)  # half epochs, the last
    with pytest.raises(ValueError, match="--posthoc does not apply to --task rul"):
        StudyConfig(task="rul", data_dir="x", posthoc=False).resolved()


def test_sigma_rel_is_chosen_on_validation_not_test():
    n = len(SIGMA_RELS)

    def part(seed):
        curve = [
            {"acc": 0.9 if i == 0 else 0.8, "nll": 0.5, "fit": 0.0,
             "val_acc": 0.7 if i in (3, 5) else 0.6, "val_nll": 0.4 if i == 5 else 0.45}
            for i in range(n)
        ]  # fmt: skip
        kept = {str(r): {**curve[SIGMA_RELS.index(r)], "weights_rel_diff": 0.0} for r in KEPT}
        return {"posthoc": {"curve": curve, "kept": kept, "decays": {}, "snapshots": 3,
                            "snapshot_every": 5, "seconds": 1.0 + seed}}  # fmt: skip

    live = {"acc": {"mean": 0.75}}
    level = summarise_posthoc([part(0), part(1)], live)
    assert level["chosen"]["sigma_rel"] == SIGMA_RELS[5]  # val acc ties 3 and 5; lower val NLL
    assert level["chosen"]["acc"] == {"mean": 0.8, "std": 0.0}
    assert level["seconds"] == {"mean": 1.5, "std": 0.5}
    assert all(k["max_acc_diff"] == 0 for k in level["kept"].values())


def test_equivalent_sigma_rel_of_a_constant_decay():
    # nearly uniform over t steps: the std of a uniform distribution, t / sqrt(12)
    assert equivalent_sigma_rel(1 - 1e-12, 3000) == pytest.approx(12**-0.5, rel=1e-3)
    # a short horizon: std of the geometric weights, sqrt(d) / (1 - d), over t
    d = 0.99
    assert equivalent_sigma_rel(d, 100_000) == pytest.approx(d**0.5 / (1 - d) / 100_000, 1e-6)
