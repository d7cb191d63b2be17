"""polyak.SWAG against a float64 reference written from Maddox et al.'s equations: moments,
deviation columns, the draw and its covariance; cadence, resume, untrusted loading, and the
sample / recompute-BN / ensemble workflow."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import polyak
from polyak.workflows import swag_predictions


def _walk(steps, seed=0):
    rng = np.random.default_rng(seed)
    return list(np.cumsum(rng.normal(size=(steps, 2, 3)), axis=0) + rng.normal(size=(2, 3)))


def _maddox(collected, rank):
    """Maddox et al. 2019, Sec. 3: running mean and second moment, the last K deviations from
    the running mean at each collection (float64)."""
    mean = np.zeros_like(collected[0])
    sq = np.zeros_like(collected[0])
    devs = []
    for n, theta in enumerate(collected):
        mean = (n * mean + theta) / (n + 1)
        sq = (n * sq + theta**2) / (n + 1)
        devs.append(theta - mean)
    return mean, sq - mean**2, devs[-rank:]


def _feed(values, **kwargs):
    model = torch.nn.Linear(3, 2, bias=False).double()
    swag = polyak.SWAG(model, dtype=torch.float64, **kwargs)
    for v in values:
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(v))
        swag.update()
    return model, swag


@pytest.mark.parametrize("rank, start, every", [(3, 0, 1), (5, 4, 3), (10, 0, 2)])
def test_moments_and_columns_match_the_papers_equations(rank, start, every):
    values = _walk(23)
    _, swag = _feed(values, rank=rank, start_step=start, update_every=every)
    collected = [values[t - 1] for t in range(start + every, 24, every)]
    assert swag.collected == len(collected)
    mean, var, devs = _maddox(collected, rank)
    m = swag.moments()
    np.testing.assert_allclose(m["mean"]["weight"].numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(m["variance"]["weight"].numpy(), var, rtol=1e-9, atol=1e-12)
    got = [d["weight"].numpy() for d in swag.deviations()]
    assert len(got) == len(devs)
    for a, b in zip(got, devs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("covariance", ["low-rank", "diagonal"])
def test_a_draw_is_the_papers_formula_with_the_same_normals(covariance):
    values = _walk(9)
    model, swag = _feed(values, rank=4)
    mean, var, devs = _maddox(values, 4)
    swag.sample(model, scale=0.3, covariance=covariance, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    z2 = torch.randn(4, generator=g, dtype=torch.float64).numpy()
    z1 = torch.randn((2, 3), generator=g, dtype=torch.float32).double().numpy()
    if covariance == "diagonal":
        want = mean + np.sqrt(0.3) * np.sqrt(var) * z1
    else:
        low = sum(w * d for w, d in zip(z2, devs)) / np.sqrt(2 * 3)
        want = mean + np.sqrt(0.3) * (np.sqrt(var) * z1 / np.sqrt(2) + low)
    np.testing.assert_allclose(model.weight.detach().numpy(), want, rtol=1e-6, atol=1e-6)


def test_the_draws_have_the_papers_covariance():
    values = _walk(12, seed=3)
    model, swag = _feed(values, rank=5)
    mean, var, devs = _maddox(values, 5)
    d = np.stack([x.ravel() for x in devs], 1)
    want = 0.5 * (np.diag(var.ravel()) + d @ d.T / 4) * 0.8
    g = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(6000):
        swag.sample(model, scale=0.8, generator=g)
        draws.append(model.weight.detach().numpy().ravel().copy())
    draws = np.array(draws)
    np.testing.assert_allclose(
        draws.mean(0), mean.ravel(), atol=0.08 * np.sqrt(want.diagonal().max())
    )
    np.testing.assert_allclose(np.cov(draws.T), want, atol=0.06 * np.abs(want).max())
    swag.sample(model, scale=0.0)
    np.testing.assert_allclose(model.weight.detach().numpy(), mean, rtol=1e-12)


def test_resume_is_bit_exact_and_a_bad_state_changes_nothing():
    values = _walk(14)
    model, swag = _feed(values[:7], rank=3, update_every=2)
    saved = copy.deepcopy(swag.state_dict())
    other = polyak.SWAG(copy.deepcopy(model), rank=3, update_every=2, dtype=torch.float64)
    other.load_state_dict(saved)
    for v in values[7:]:
        for m, s in ((model, swag), (other.__dict__["_model"], other)):
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(v))
            s.update()
    for a, b in zip(swag.state_dict()["rows"], other.state_dict()["rows"]):
        assert torch.equal(a["weight"], b["weight"])
    before = copy.deepcopy(other.state_dict())
    bad = copy.deepcopy(saved)
    bad["rows"][3]["weight"][0, 0] = float("nan")
    with pytest.raises(polyak.NonFiniteError, match="SWAG row 3"):
        other.load_state_dict(bad)
    bad = copy.deepcopy(saved)
    bad["collected"] = 99
    with pytest.raises(ValueError, match="inconsistent"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="rank=3"):
        polyak.SWAG(copy.deepcopy(model), rank=4, dtype=torch.float64).load_state_dict(saved)
    after = other.state_dict()
    assert after["collected"] == before["collected"]
    assert all(torch.equal(a["weight"], b["weight"]) for a, b in zip(after["rows"], before["rows"]))


def test_bad_arguments_are_named():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="rank"):
        polyak.SWAG(model, rank=0)
    swag = polyak.SWAG(model, rank=2)
    with pytest.raises(ValueError, match="collected 0 models"):
        swag.sample()
    swag.update()
    with pytest.raises(ValueError, match="needs 2"):
        swag.sample()
    swag.sample(covariance="diagonal")
    with pytest.raises(ValueError, match="covariance"):
        swag.sample(covariance="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        swag.sample(scale=-1.0)


def test_swag_predictions_is_the_loop_it_stands_for_and_gives_the_model_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
    )
    swag = polyak.SWAG(model, rank=3)
    train = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in train * 3:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        swag.update()
    test = [(torch.randn(10, 4), torch.randint(0, 3, (10,)))]
    before = copy.deepcopy(model.state_dict())
    got = swag_predictions(swag, model, test, samples=4, bn_loader=train,
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    g, probs = torch.Generator().manual_seed(1), []
    replay = copy.deepcopy(model)
    for _ in range(4):
        swag.sample(replay, generator=g)
        polyak.recompute_bn(replay, train)
        replay.eval()
        with torch.no_grad():
            probs.append(torch.softmax(replay(test[0][0]).double(), -1))
    torch.testing.assert_close(got.probs, (sum(probs) / 4).float())
    with pytest.raises(ValueError, match="bn_loader"):
        swag_predictions(swag, model, test, samples=1)


def test_frozen_parameters_are_not_stored_and_samples_leave_them():
    """A parameter that does not require grad when SWAG is built never moves: its Gaussian is
    a point mass, so it is neither stored nor drawn."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    frozen = {k: v.clone() for k, v in model[0].state_dict().items()}
    swag = polyak.SWAG(model, rank=2)
    assert swag.names == ["1.weight", "1.bias"]
    whole = polyak.SWAG(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), rank=2)
    assert swag.nbytes < whole.nbytes  # the frozen layer has no rows
    for _ in range(3):
        with torch.no_grad():
            model[1].weight.add_(torch.randn(2, 3))
        swag.update()
    swag.sample(model, generator=torch.Generator().manual_seed(0))
    for k, v in model[0].state_dict().items():
        assert torch.equal(v, frozen[k])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        polyak.SWAG(model)
