"""ema-pytorch's PostHocEMA (ema_pytorch/post_hoc_ema.py, 0.8.x) on the same streams as ours."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyak

ema_pytorch = pytest.importorskip("ema_pytorch")
from ema_pytorch.post_hoc_ema import PostHocEMA as LucidPostHocEMA  # noqa: E402

pytestmark = pytest.mark.slow  # differential tests against the peer libraries


def _constant_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2))


def test_its_combination_weights_do_not_sum_to_one_so_a_constant_stream_comes_back_scaled(tmp_path):
    """It solves A x = b and uses x as is; EDM2 (and we) rescale x to sum to 1."""
    model = _constant_model()
    theirs = LucidPostHocEMA(
        model,
        sigma_rels=(0.05, 0.10),
        update_every=1,
        checkpoint_every_num_steps=200,
        checkpoint_folder=str(tmp_path / "lucid"),
        checkpoint_dtype=torch.float32,
    )
    ours = polyak.PostHocEMA(
        model, tmp_path / "ours", snapshot_every=200, snapshot_dtype=torch.float32
    )
    for _ in range(1000):  # the weights never change
        theirs.update()
        ours.update()
    ours.close()
    synthesized = theirs.synthesize_ema_model(sigma_rel=0.15).ema_model
    rec = polyak.posthoc.reconstruct(tmp_path / "ours", sigma_rel=0.15)
    scale = []
    for name, value in model.state_dict().items():
        assert torch.equal(rec[name], value)  # exactly the constant
        scale.append((synthesized.state_dict()[name] / value).mean().item())
    print(f"ema-pytorch returns the constant times {sum(scale) / len(scale):.6f}")
    assert all(abs(s - 1) > 1e-4 for s in scale)  # scaled by sum(x) != 1 (5 snapshots each)
    assert rec.coefficients.sum() == pytest.approx(1.0, abs=1e-12)


def _ramp_average(make, k, steps=3000):
    """Average of the stream w(t) = t (one weight); a power average of it is t (g+1)/(g+2)."""
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    model = nn.ParameterList([w])
    update, value = make(model, k)
    for t in range(1, steps + 1):
        with torch.no_grad():
            w.fill_(float(t))
        update()
    return value() / steps


def test_its_update_every_stretches_the_horizon_ours_keeps_it(tmp_path):
    gamma = polyak.schedules.sigma_rel_to_gamma(0.10)
    exact = (gamma + 1) / (gamma + 2)  # mean of the profile t**gamma on [0, 1]: 0.888

    def lucid(model, k):
        ph = LucidPostHocEMA(
            model,
            sigma_rels=(0.05, 0.10),
            update_every=k,
            checkpoint_every_num_steps="manual",
            checkpoint_folder=str(tmp_path / f"lucid{k}"),
        )
        return ph.update, lambda: ph.ema_models[1].ema_model[0].item()

    def ours(model, k):
        ph = polyak.PostHocEMA(model, tmp_path / f"ours{k}", update_every=k, dtype=torch.float64)
        return ph.update, lambda: ph.ema.averaged_tensors(ph.ema.names[1])["0"].item()

    got = {
        (name, k): _ramp_average(make, k)
        for name, make in (("lucid", lucid), ("ours", ours))
        for k in (1, 10, 100)
    }
    print({key: round(v, 3) for key, v in got.items()}, "exact", round(exact, 3))
    for k in (1, 10, 100):  # a value stands for its whole gap of k steps: + k/2 steps
        assert got["ours", k] == pytest.approx(exact + k / 2 / 3000, abs=1e-3)
    assert got["lucid", 1] == pytest.approx(exact, abs=1e-3)
    assert got["lucid", 10] < exact - 0.3 and got["lucid", 100] < 0.2  # ~10x / ~100x too long


def test_it_globs_every_checkpoint_in_the_folder_ours_reads_only_its_manifest(tmp_path):
    """A second run into the same folder (stopped earlier) silently reuses the first run's
    later checkpoints; ours refuses to write into another run's store."""

    def lucid_run(scale, steps):
        model = _constant_model()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        ph = LucidPostHocEMA(
            model,
            sigma_rels=(0.05, 0.10),
            update_every=1,
            checkpoint_every_num_steps=100,
            checkpoint_folder=str(tmp_path / "lucid"),
            checkpoint_dtype=torch.float32,
        )
        for _ in range(steps):
            ph.update()
        return model, ph

    lucid_run(1.0, 300)
    model, second = lucid_run(3.0, 200)  # its own checkpoints: steps 100 and 200
    mixed = second.synthesize_ema_model(sigma_rel=0.1).ema_model.state_dict()
    ratio = (mixed["0.weight"] / model.state_dict()["0.weight"]).mean().item()
    print(f"ema-pytorch, second run: weights {ratio:.3f} x its own constant (1/3: the first run's)")
    assert abs(ratio - 1 / 3) < 0.05  # the first run's step-300 checkpoints win

    ours_model = _constant_model()
    first = polyak.PostHocEMA(ours_model, tmp_path / "ours", snapshot_every=100)
    for _ in range(300):
        first.update()
    first.close()
    second_ours = polyak.PostHocEMA(_constant_model(), tmp_path / "ours", snapshot_every=100)
    with pytest.raises(polyak.posthoc.ForeignRunError):
        for _ in range(100):
            second_ours.update()
