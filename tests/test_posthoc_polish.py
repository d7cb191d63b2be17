"""Post-hoc EMA as a new user meets it: results keyed by target, the averages kept addressable by
their sigma_rel, a poor profile fit warned about (with the fit and what would improve it) at the
caller's line."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import polyak
from posthoc_helpers import Walk, small_model, walked_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return walked_store(tmp_path_factory.mktemp("store"))


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno  # type: ignore[union-attr]


def test_reconstruct_many_is_keyed_by_target(store):
    recs = polyak.posthoc.reconstruct_many(store, [0.05, 0.08], decays=[0.97])
    assert isinstance(recs, polyak.posthoc.Reconstructions)
    assert list(recs) == ["sigma_rel=0.05", "sigma_rel=0.08", "decay=0.97"]
    assert recs[0.08] is recs["sigma_rel=0.08"]  # a number is a sigma_rel
    assert recs[polyak.posthoc.Target.make(decay=0.97)] is recs["decay=0.97"]
    assert 0.08 in recs and 0.3 not in recs and "decay=0.97" in recs
    one = polyak.posthoc.reconstruct(store, sigma_rel=0.08)
    for name in one:  # the same coefficients (summed in another order: float32 rounding)
        torch.testing.assert_close(one[name], recs[0.08][name], rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match=r"no reconstruction of 0.12; the targets are \['sigma"):
        recs[0.12]
    with pytest.raises(ValueError, match=r"the targets \['sigma_rel=0.05'\] are given twice"):
        polyak.posthoc.reconstruct_many(store, [0.05, 0.05])


def test_the_averages_kept_are_addressable_by_sigma_rel(store):
    model = small_model()
    ph = polyak.PostHocEMA(model, store.parent / "kept", snapshot_every=1000)
    walk = Walk(model)
    for _ in range(5):
        walk.step()
        ph.update()
    assert ph.averages == {0.05: "power(sigma_rel=0.05)", 0.1: "power(sigma_rel=0.1)"}
    state = ph.averaged_state_dict(sigma_rel=0.1)
    expected = ph.ema.averaged_state_dict("power(sigma_rel=0.1)")
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    x = torch.randn(4, 6)
    model.eval()
    with ph.ema.swapped(model, "power(sigma_rel=0.05)"):
        want = model(x)
    with ph.swapped(sigma_rel=0.05) as swapped:
        assert swapped is model
        assert torch.equal(model(x), want)
    assert ph.name_of(0.05) == "power(sigma_rel=0.05)"
    with pytest.raises(KeyError, match=r"no average of sigma_rel=0.2 is kept.*0.05, 0.1"):
        ph.name_of(0.2)
    with pytest.raises(ValueError, match="several averages are kept"):
        ph.averaged_state_dict()


def test_a_poor_fit_warns_with_the_fit_and_what_would_improve_it_at_the_callers_line(store):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _line() + 1
        rec = polyak.posthoc.reconstruct(store, sigma_rel=0.01)
    poor = [w for w in caught if "fit its weight profile only" in str(w.message)]
    assert len(poor) == 1
    w = poor[0]
    assert (w.filename, w.lineno) == (__file__, line)  # the caller's line, not polyak's
    assert f"only to {rec.fit:.2f}" in str(w.message) and rec.fit > 0.1
    assert "narrower than the narrowest average kept (sigma_rel 0.05, 0.1)" in str(w.message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _line() + 1
        polyak.posthoc.reconstruct_many(store, [0.28], decays=[0.5])
    messages = {str(w.message).split(":")[0]: w for w in caught}
    assert "wider than the widest average kept" in str(messages["sigma_rel=0.28"].message)
    assert "narrower than the narrowest" in str(messages["decay=0.5"].message)
    assert {(w.filename, w.lineno) for w in caught} == {(__file__, line)}


def test_a_good_fit_does_not_warn(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = polyak.posthoc.reconstruct(store, sigma_rel=0.08)
    assert rec.fit < 0.1


def test_every_store_warning_points_at_the_caller(tmp_path):
    model = small_model()
    ph = polyak.PostHocEMA(model, tmp_path, snapshot_every=10, snapshot_dtype=torch.float32)
    for _ in range(30):
        ph.update()
    ph.close()
    (tmp_path / "stray.bin").write_bytes(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _line() + 1
        polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.08)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]
    assert "stray.bin" in str(caught[0].message)
