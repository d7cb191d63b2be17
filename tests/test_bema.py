"""BEMA (polyak.averages.bema) in polyak.EMA: a float64 reference written from Block & Zhang's
equations, TRL's BEMACallback in a real transformers Trainer, every read corrected, resume
bit-exact, several BEMA and plain averages in one EMA, all-or-nothing loading."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import polyak
import reference
from polyak.averages import bema
from polyak.integrations._ema_files import read_ema_files, save_ema_files


def _trajectory(steps: int, shape=(3, 4), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(size=(steps + 1, *shape)), axis=0)
    return list(walk * 0.3 + 0.05 * np.arange(steps + 1)[:, None, None])


def _run(values, decay, update_every=1):
    model = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(values[0]))
    ema = polyak.EMA(model, decay, update_every=update_every)
    return model, ema


@pytest.mark.parametrize(
    "spec, every",
    [
        (bema(), 1),
        (bema(0.7, 0.4, lag=2.0, multiplier=3.0, min_ema_multiplier=0.05), 1),
        (bema(anchor_step=4), 1),
        (bema(), 3),
        (bema(per_update=True), 3),
        (bema(anchor_step=5), 2),
    ],
)
def test_every_read_matches_the_papers_equations_in_float64(spec, every):
    values = _trajectory(24)
    ref = reference.bema(values, spec, every)
    model, ema = _run(values, {"bema": spec, "plain": 0.9}, every)
    for t in range(1, len(values)):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(values[t]))
        ema.update()
        if t in ref:
            want = ref[t]
            got = ema.averaged_state_dict("bema")["weight"].double().numpy()
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
            with ema.swapped(model, "bema"):
                np.testing.assert_allclose(model.weight.detach().double(), want, atol=2e-6)
            module = ema.get_module("bema")
            np.testing.assert_allclose(module.weight.detach().double(), want, atol=2e-6)
    target = copy.deepcopy(model)
    ema.copy_to(target, "bema")
    np.testing.assert_allclose(target.weight.detach().double(), ref[max(ref)], atol=2e-6)
    # the stored EMA part is what averaged_tensors gives: BEMA minus the correction
    alpha = ema._timeline.alpha(0)
    anchor = ema.state_dict()["anchors"]["bema"]["weight"].double()
    raw = ema.averaged_tensors("bema")["weight"].double()
    live = model.weight.detach().double()
    np.testing.assert_allclose(raw + alpha * (live - anchor), ref[max(ref)], atol=2e-6)


def test_eta_large_is_the_plain_warm_up_ema_and_the_update_cost_is_the_plain_one():
    values = _trajectory(10)
    model, ema = _run(values, {"b": bema(bias_power=60.0), "w": lambda t, dt: 0.0})
    assert ema.nbytes == 3 * 12 * 4  # two averages and one anchor: three rows
    probe = polyak.EMA(copy.deepcopy(model), bema())
    calls = []
    lerp = torch._foreach_lerp_

    def counted(*args):
        calls.append(args)
        return lerp(*args)

    torch._foreach_lerp_ = counted
    try:
        probe.update()
    finally:
        torch._foreach_lerp_ = lerp
    assert len(calls) == 1  # the EMA part's lerp; the anchor (decay 1) costs no kernel
    for t in range(1, 11):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(values[t]))
        ema.update()
    plain = reference.bema(values, bema(bias_power=60.0))[10]
    np.testing.assert_allclose(ema.averaged_tensors("b")["weight"], plain, atol=1e-6)


def test_a_held_module_follows_the_live_weights_and_the_updates():
    values = _trajectory(6)
    model, ema = _run(values, bema())
    module = ema.get_module()
    x = torch.randn(2, 4)
    for t in range(1, 7):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(values[t]))
        ema.update()
        torch.testing.assert_close(module(x), x @ ema.averaged_state_dict()["weight"].T)


def test_resume_is_bit_exact_with_several_bema_and_plain_averages():
    values = _trajectory(20)
    decays = {"a": bema(), "plain": 0.95, "b": bema(0.6, 0.3, anchor_step=3)}
    model, ema = _run(values, decays, update_every=2)
    for t in range(1, 9):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(values[t]))
        ema.update()
    saved = {k: v for k, v in ema.state_dict().items()}
    saved = copy.deepcopy(saved)
    resumed_model = copy.deepcopy(model)
    resumed = polyak.EMA(resumed_model, copy.deepcopy(decays), update_every=2)
    resumed.load_state_dict(saved)
    for t in range(9, 21):
        for m in (model, resumed_model):
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(values[t]))
        ema.update()
        resumed.update()
    for name in decays:
        a = ema.averaged_state_dict(name)["weight"]
        b = resumed.averaged_state_dict(name)["weight"]
        assert torch.equal(a, b), name
    refs = {n: reference.bema(values, decays[n], 2)[20] for n in ("a", "b")}
    for n, want in refs.items():
        np.testing.assert_allclose(ema.averaged_state_dict(n)["weight"], want, atol=2e-6)


def test_a_bad_anchor_changes_nothing_and_states_without_anchors_are_refused():
    values = _trajectory(4)
    model, ema = _run(values, {"b": bema()})
    for t in range(1, 5):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(values[t]))
        ema.update()
    before = copy.deepcopy(ema.state_dict())
    bad = copy.deepcopy(before)
    bad["timeline"]["step"] = 9
    bad["timeline"]["last_update_step"] = 9
    bad["anchors"]["b"]["weight"] = torch.full((3, 4), float("nan"))
    with pytest.raises(polyak.NonFiniteError, match="anchor of 'b'"):
        ema.load_state_dict(bad)
    missing = copy.deepcopy(before)
    del missing["anchors"]
    with pytest.raises(ValueError, match="no 'anchors' table"):
        ema.load_state_dict(missing)
    after = ema.state_dict()
    assert after["timeline"] == before["timeline"]
    assert torch.equal(after["anchors"]["b"]["weight"], before["anchors"]["b"]["weight"])
    plain = polyak.EMA(copy.deepcopy(model), {"b": 0.9})
    with pytest.raises(ValueError, match="anchors of BEMA"):
        plain.load_state_dict({**before, "timeline": plain.state_dict()["timeline"]})


def test_the_hugging_face_files_carry_the_anchors(tmp_path):
    values = _trajectory(3)
    model, ema = _run(values, {"plain": 0.9, "b": bema()})
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    save_ema_files(tmp_path, ema.state_dict(), run="0" * 32, global_step=1)
    state = read_ema_files(tmp_path).state
    other = polyak.EMA(copy.deepcopy(model), {"plain": 0.9, "b": bema()})
    other.load_state_dict(state)
    assert torch.equal(
        other.averaged_state_dict("b")["weight"], ema.averaged_state_dict("b")["weight"]
    )


def test_array_ema_refuses_bema():
    with pytest.raises(TypeError, match="no BEMA average"):
        polyak.ArrayEMA(np.zeros(3), {"b": bema()})


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="lag"):
        bema(lag=0.0)
    with pytest.raises(ValueError, match="ema_power"):
        bema(-1.0)
    with pytest.raises(ValueError, match="min_ema_multiplier"):
        bema(min_ema_multiplier=2.0)
    with pytest.raises(TypeError, match="per_update"):
        bema(per_update=1)  # type: ignore[arg-type]


def test_exports_and_frozen_parameters_give_the_corrected_average(tmp_path):
    """A frozen parameter is not stored (nor anchored): its BEMA is itself; polyak.export
    writes the corrected weights, not the stored EMA part."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    import polyak.export

    values = _trajectory(6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2))
    model[1].requires_grad_(False)  # frozen: read from the model
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(values[0]))
    spec = bema(0.5, 0.3, lag=2.0)
    ema = polyak.EMA(model, {"b": spec})
    assert ema.nbytes == 2 * 12 * 4  # the EMA part and the anchor of the trained layer only
    for t in range(1, 7):
        with torch.no_grad():
            model[0].weight.copy_(torch.from_numpy(values[t]))
        ema.update()
    want = reference.bema(values, spec)[6]
    path = polyak.export.save(ema, tmp_path / "b.safetensors")
    saved = load_file(path)
    np.testing.assert_allclose(saved["0.weight"].double().numpy(), want, rtol=2e-6, atol=2e-6)
    assert not np.allclose(ema.averaged_tensors()["0.weight"].double().numpy(), want, atol=1e-3)
    for k in ("1.weight", "1.bias"):
        assert torch.equal(saved[k], model.state_dict()[k])
    with safe_open(str(path), "pt") as f:
        assert '"kind": "bema"' in f.metadata()["polyak.schedule"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    ema.copy_to(other)
    np.testing.assert_allclose(other[0].weight.detach().double().numpy(), want, atol=2e-6)
    assert torch.equal(other[1].weight, model[1].weight)  # the frozen one: the live value
