"""polyak.EMA: numerics against the float64 reference, buffers, names, swaps, module, state."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import polyak
import reference
from polyak import schedules
from torch_helpers import Tied, bn_net, float_state, randomize_


def run_stream(model, ema, steps, seed=0, scale=0.1):
    """Drive `model` through `steps` random steps, updating `ema`; return the states seen."""
    gen = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        randomize_(model, gen, scale)
        seen.append(float_state(model))
        ema.update()
    return seen


def test_matches_float64_reference_for_every_tensor():
    model = bn_net()
    init = float_state(model)
    ema = polyak.EMA(model, decay=0.9)
    seen = run_stream(model, ema, 30)
    avg = ema.averaged_tensors()
    for name, x0 in init.items():
        exp = reference.ema([s[name] for s in seen], [0.9] * 30, x0)
        np.testing.assert_allclose(avg[name].double().numpy(), exp, rtol=1e-5, atol=1e-6)
    assert avg["1.num_batches_tracked"].item() == model[1].num_batches_tracked.item() == 30
    assert avg["1.num_batches_tracked"].dtype == torch.long
    assert (
        ema.step == 30
        and ema.timeline.num_updates == 30
        and ema.timeline.last_decays == {"0.9": 0.9}
    )


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize(
    "sched",
    [
        schedules.constant(0.9),
        schedules.warmup(0.99),
        schedules.power(sigma_rel=0.1),
        schedules.uniform(),
    ],
)
def test_schedules_update_every_and_start_step_match_reference(sched, k):
    model = bn_net()
    init = float_state(model)
    ema = polyak.EMA(model, decay=sched, update_every=k, start_step=6)
    seen = run_stream(model, ema, 25)
    avg = ema.averaged_tensors()
    for name in ("0.weight", "1.running_var"):
        exp = reference.timeline_average([s[name] for s in seen], sched.per_step, init[name], k, 6)
        np.testing.assert_allclose(avg[name].double().numpy(), exp, rtol=1e-5, atol=1e-6)


def test_bf16_model_fp32_average_tracks_float64_and_plain_bf16_freezes():
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = polyak.EMA(model, decay=0.9999)
    target = torch.full_like(model.weight, 1.5)
    naive = model.weight.detach().clone()  # what a bf16 average does (every peer's default)
    exp = 1.0
    for _ in range(2000):
        with torch.no_grad():
            model.weight.copy_(target)
        ema.update()
        naive.lerp_(target, 1 - 0.9999)
        exp = 0.9999 * exp + (1 - 0.9999) * 1.5
    got = ema.averaged_tensors()["weight"]
    assert got.dtype == torch.float32
    err = (got.double() - exp).abs().max().item()
    assert err < 1e-5, err  # float64 reference: 1.0906...
    assert exp - 1.0 > 0.09
    assert torch.all(naive == 1.0)  # the bf16 average never moved


def test_bf16_model_with_random_stream_relative_error():
    model = bn_net().to(torch.bfloat16)
    init = float_state(model)
    ema = polyak.EMA(model, decay=0.99)
    seen = run_stream(model, ema, 200, scale=0.01)
    for name in ("0.weight", "3.bias"):
        exp = reference.ema([s[name] for s in seen], [0.99] * 200, init[name])
        got = ema.averaged_tensors()[name].double().numpy()
        np.testing.assert_allclose(got, exp, rtol=0, atol=1e-6 * max(1.0, np.abs(exp).max()))


def test_float64_model_keeps_float64_average():
    model = bn_net().double()
    ema = polyak.EMA(model, 0.5)
    assert ema.averaged_tensors()["0.weight"].dtype == torch.float64


def test_low_precision_storage_is_opt_in_and_warns():
    with pytest.warns(UserWarning, match="ulp"):
        ema = polyak.EMA(bn_net(), 0.999, dtype=torch.bfloat16)
    assert ema.averaged_tensors()["0.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("policy", ["average", "copy", "ignore"])
def test_buffer_policies_and_integer_buffers(policy):
    model = bn_net()
    ema = polyak.EMA(model, 0.5, buffers=policy)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        randomize_(model, gen)
        ema.update()
    names = list(ema.averaged_tensors())
    assert "1.num_batches_tracked" in names  # integers always copied
    assert ema.averaged_tensors()["1.num_batches_tracked"].item() == 3
    live = model[1].running_mean
    if policy == "ignore":
        assert "1.running_mean" not in names
        assert ema.get_module()[1].running_mean is live  # shared with the model
    elif policy == "copy":
        assert torch.equal(ema.averaged_tensors()["1.running_mean"], live)
    else:
        assert not torch.equal(ema.averaged_tensors()["1.running_mean"], live)


def test_include_exclude_globs():
    ema = polyak.EMA(bn_net(), 0.5, exclude=["*.bias", "1.*"])
    assert list(ema.averaged_tensors()) == ["0.weight", "3.weight"]
    ema = polyak.EMA(bn_net(), 0.5, include="0.*")
    assert list(ema.averaged_tensors()) == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match="no tensor to average"):
        polyak.EMA(bn_net(), include="nothing*")
    with pytest.raises(TypeError, match="glob"):
        polyak.EMA(bn_net(), include=[3])


def test_names_are_canonical_through_wrappers():
    model = bn_net()
    wrapped = nn.DataParallel(torch.compile(model, backend="eager"))
    ema = polyak.EMA(wrapped, 0.5)
    assert "0.weight" in list(ema.averaged_tensors())
    assert all(not n.startswith(("module.", "_orig_mod.")) for n in list(ema.averaged_tensors()))
    sd = ema.state_dict()
    sd["averages"]["0.5"] = {"module._orig_mod." + k: v for k, v in sd["averages"]["0.5"].items()}
    plain = polyak.EMA(bn_net(seed=1), 0.5)
    plain.load_state_dict(sd)
    assert torch.equal(plain.averaged_tensors()["0.weight"], model[0].weight)
    ema.update(model)  # the common recipe passes the (unwrapped) model: same tensors


def test_update_with_other_model_matches_by_name_and_names_mismatches():
    a, b = bn_net(0), bn_net(1)
    ema = polyak.EMA(a, 0.0)
    ema.update(b)  # decay 0 copies: now follows b
    assert torch.equal(ema.averaged_tensors()["0.weight"], b[0].weight)
    other = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 4))
    with pytest.raises(ValueError, match="3.weight"):
        ema.update(other)
    extra = bn_net()
    extra.add_module("4", nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"unexpected \['4.weight', '4.bias'\]"):
        ema.update(extra)
    assert ema.step == 1  # failed updates changed nothing


def test_swapped_gives_training_weights_back_bit_for_bit_even_on_error():
    model = bn_net()
    ema = polyak.EMA(model, 0.9)
    run_stream(model, ema, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with pytest.raises(ZeroDivisionError), ema.swapped(model):
        with pytest.warns(UserWarning, match="saves the average"):
            inside = model.state_dict()
        for k, v in ema.averaged_tensors().items():
            assert torch.equal(inside[k], v)
        1 / 0  # noqa: B018
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.data_ptr() == ptrs[k]
    x = torch.randn(4, 5)
    model.eval()
    with ema.swapped():
        y_avg = model(x)
    ema.get_module().eval()
    torch.testing.assert_close(y_avg, ema.get_module()(x), rtol=0, atol=0)


def test_update_and_checkpoint_while_swapped():
    model = bn_net()
    ema = polyak.EMA(model, 0.9)
    with ema.swapped(model):
        with pytest.raises(RuntimeError, match="swapped"):
            ema.update()
        with pytest.warns(UserWarning, match="saves the average"):
            model.state_dict()
        with pytest.raises(RuntimeError, match="restore"):
            ema.copy_to(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.state_dict()  # the hook is gone
    ema.update()
    ema.apply_shadow(model)
    with pytest.raises(RuntimeError, match="already swapped"):
        ema.apply_shadow(model)
    ema.restore(model)
    with pytest.raises(RuntimeError, match="nothing is swapped"):
        ema.restore(model)


def test_swap_into_bf16_model_casts_and_restores():
    model = bn_net().to(torch.bfloat16)
    ema = polyak.EMA(model, 0.9)
    run_stream(model, ema, 3)
    w = model[0].weight.detach().clone()
    with ema.swapped(model):
        assert model[0].weight.dtype == torch.bfloat16
        exp = ema.averaged_tensors()["0.weight"].to(torch.bfloat16)
        assert torch.equal(model[0].weight, exp)
    assert torch.equal(model[0].weight, w)


def test_copy_to_is_permanent():
    model = bn_net()
    ema = polyak.EMA(model, 0.9)
    run_stream(model, ema, 3)
    ema.copy_to(model)
    for k, v in ema.averaged_tensors().items():
        assert torch.equal(model.state_dict()[k], v)


def test_module_shares_storage_follows_updates_and_keeps_ties():
    model = Tied()
    ema = polyak.EMA(model, 0.5)
    m = ema.get_module()
    assert m.head.weight is m.emb.weight  # still tied
    assert m.emb.weight.data_ptr() == ema.averaged_tensors()["emb.weight"].data_ptr()
    assert not m.training and not m.emb.weight.requires_grad
    assert list(ema.averaged_tensors()) == ["emb.weight"]
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    ema.update()
    assert torch.equal(m.emb.weight, ema.averaged_tensors()["emb.weight"])
    assert ema.get_module() is m  # cached


def test_lazy_module_builds_at_first_update():
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 2))
    ema = polyak.EMA(model, 0.5)
    with pytest.raises(ValueError, match="not initialised"):
        ema.update()
    model(torch.randn(2, 6))
    ema.update()
    assert ema.averaged_tensors()["0.weight"].shape == (3, 6)


def test_state_dict_round_trip_with_weights_only_and_exact_resume():
    decays = {"c": 0.95, "w": schedules.warmup(0.999), "p": schedules.power(sigma_rel=0.05)}

    def make():
        model = bn_net()
        return model, polyak.EMA(model, decays, update_every=2)

    model_a, full = make()
    run_stream(model_a, full, 30, seed=5)

    model_b, first = make()
    gen = torch.Generator().manual_seed(5)
    for _ in range(12):
        randomize_(model_b, gen)
        first.update()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = polyak.EMA(model_b, decays, update_every=2)
    resumed.load_state_dict(state)
    for _ in range(18):
        randomize_(model_b, gen)
        resumed.update()
    for name in decays:
        for k, v in full.averaged_tensors(name).items():
            assert torch.equal(resumed.averaged_tensors(name)[k], v), (name, k)
    assert resumed.step == 30 and resumed.timeline.last_decays == full.timeline.last_decays


def test_load_keeps_dtype_and_validates_before_writing():
    model = bn_net()
    ema = polyak.EMA(model, 0.9)
    sd = {**ema.state_dict()}
    sd["averages"] = {"0.9": {k: v.to(torch.bfloat16) for k, v in sd["averages"]["0.9"].items()}}
    ema.load_state_dict(sd)
    assert ema.averaged_tensors()["0.weight"].dtype == torch.float32
    before = ema.averaged_tensors()["0.weight"].clone()
    bad = {**ema.state_dict()}
    bad["averages"] = {"0.9": {**bad["averages"]["0.9"], "3.weight": torch.zeros(9, 9)}}
    with pytest.raises(ValueError, match=r"3.weight has shape \(9, 9\)"):
        ema.load_state_dict(bad)
    bad["averages"] = {"0.9": {k: v for k, v in bad["averages"]["0.9"].items() if k != "0.bias"}}
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        ema.load_state_dict(bad)
    assert torch.equal(ema.averaged_tensors()["0.weight"], before)
    with pytest.raises(ValueError, match=r"saved averages: missing \['0.99'\]"):
        polyak.EMA(model, [0.9, 0.99]).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="format"):
        ema.load_state_dict({"format": "timm"})


def test_several_averages_equal_separate_emas_bit_for_bit():
    decays = [0.9, schedules.warmup(0.99), schedules.power(gamma=7.0), schedules.uniform()]
    model = bn_net()
    multi = polyak.EMA(model, decays, update_every=3)
    singles = [polyak.EMA(model, d, update_every=3) for d in decays]
    gen = torch.Generator().manual_seed(9)
    for _ in range(20):
        randomize_(model, gen)
        multi.update()
        for s in singles:
            s.update()
    for name, s in zip(multi.names, singles):
        for k, v in s.averaged_tensors().items():
            assert torch.equal(multi.averaged_tensors(name)[k], v)
        with multi.swapped(model, name=name):
            assert torch.equal(model[0].weight, s.averaged_tensors()["0.weight"])
        assert torch.equal(multi.get_module(name)[3].weight, s.get_module()[3].weight)
    with pytest.raises(ValueError, match="several averages"):
        multi.get_module()


def test_compiled_model_sees_swapped_weights():
    model = bn_net().eval()
    compiled = torch.compile(model, backend="aot_eager")
    ema = polyak.EMA(compiled, 0.0)
    x = torch.randn(3, 5)
    live_out = compiled(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    ema.update()  # decay 0: the average is now the doubled weights
    with torch.no_grad():
        for p in model.parameters():
            p.div_(2)
    with ema.swapped(compiled):
        avg_out = compiled(x)
    torch.testing.assert_close(compiled(x), live_out)
    assert not torch.allclose(avg_out, live_out)
    torch.testing.assert_close(avg_out, ema.get_module()(x))


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        polyak.EMA([torch.zeros(2)])
    with pytest.raises(TypeError, match="dtype"):
        polyak.EMA(bn_net(), dtype=torch.long)
    with pytest.raises(ValueError, match="buffers"):
        polyak.EMA(bn_net(), buffers="mean")
    with pytest.raises(ValueError, match="update_every"):
        polyak.EMA(bn_net(), update_every=0)
    ema = polyak.EMA(bn_net())
    with pytest.raises(ValueError, match="steps"):
        ema.update(steps=0)
    with pytest.raises(KeyError, match="nope"):
        ema.get_module("nope")


def test_repr_and_nbytes():
    ema = polyak.EMA(bn_net(), [0.9, 0.99])
    n = sum(p.numel() for p in bn_net().parameters()) + 14  # + running mean/var
    assert ema.nbytes >= 2 * 4 * n
    assert "0.99" in repr(ema)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 18])
def test_staged_update_through_scratch_equals_cast_then_lerp(chunk):
    from polyak._torch.groups import StagedGroup
    from polyak._torch.segments import Segment

    gen = torch.Generator().manual_seed(0)
    lives = [
        torch.randn(5, 3, 4, 4, generator=gen)
        .to(torch.bfloat16)
        .to(memory_format=torch.channels_last),
        torch.randn(100, generator=gen).to(torch.bfloat16),
        torch.randn(2, 50, generator=gen).to(torch.bfloat16),
        torch.randn((), generator=gen).to(torch.bfloat16),
    ]
    rows = [[torch.randn(t.shape, generator=gen) for t in lives] for _ in range(2)]
    expected = [[a.clone() for a in row] for row in rows]
    segments = [Segment([row[i] for row in rows], t) for i, t in enumerate(lives)]
    group = StagedGroup(segments, chunk=chunk)
    for decays in [(0.9, 0.5), (0.0, 1.0), (0.99, 0.3)]:
        group.apply(decays)
        for row, d in zip(expected, decays):
            for a, t in zip(row, lives):
                a.lerp_(t.float(), 1 - d)
    for row, exp in zip(rows, expected):
        for a, b in zip(row, exp):
            assert torch.equal(a, b)
    if chunk == 7:
        assert len(group.batches) >= 5  # split into many batches


def test_writes_into_a_cast_swap_reach_the_average_and_untouched_tensors_stay_exact():
    model = bn_net().to(torch.bfloat16)
    ema = polyak.EMA(model, 0.9)
    run_stream(model, ema, 3)
    before = {k: v.clone() for k, v in ema.averaged_tensors().items()}
    with ema.swapped(model):
        model[1].running_mean.fill_(0.5)  # what recompute_bn does inside the block
    after = ema.averaged_tensors()
    assert torch.equal(after["1.running_mean"], torch.full((7,), 0.5))
    for k, v in before.items():
        if k != "1.running_mean":
            assert torch.equal(after[k], v), k  # no bf16 rounding written back


def test_update_lists_are_the_update_kernels():
    """A bare lerp over update_lists() gives what update() gives, for flat and scattered models."""
    for flat in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        ema = polyak.EMA(model, decay=[0.9, 0.5], flat_params=flat)
        twin = polyak.EMA(model, decay=[0.9, 0.5])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update()
        for name, decay in zip(twin.names, (0.9, 0.5)):
            lists = twin._update_lists(name)
            with torch.no_grad():
                for avgs, sources in lists.averaged:
                    torch._foreach_lerp_(avgs, sources, 1.0 - decay)
                for dsts, sources in lists.copied:
                    torch._foreach_copy_(dsts, sources)
            ours, theirs = ema.averaged_tensors(name), twin.averaged_tensors(name)
            for n in ours:
                assert torch.equal(ours[n], theirs[n]), (flat, name, n)
        assert ema._update_lists("0.9").launches >= 1
    assert len(polyak.EMA(model, flat_params=True)._update_lists().averaged[0][0]) == 1


def test_averaged_state_dict_is_the_state_dict_inside_swapped():
    from torch_helpers import Tied

    for model in (bn_net(), Tied()):
        ema = polyak.EMA(model, 0.5)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update()
        got = ema.averaged_state_dict()
        with ema.swapped(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {k: v.clone() for k, v in model.state_dict().items()}
        assert got.keys() == expected.keys()
        for k in got:
            assert torch.equal(got[k], expected[k]), k
        assert not any(t.sharded for t in ema.layout().values())


def test_live_tensors_and_timeline_positions():
    model = bn_net()
    ema = polyak.EMA(model, 0.9, update_every=2, start_step=3)
    live = ema.live_tensors()
    assert list(live) == list(ema.averaged_tensors())
    assert (
        live["0.weight"] is model[0].weight
        and live["1.num_batches_tracked"] is model[1].num_batches_tracked
    )
    for _ in range(5):
        ema.update()
    assert (ema.step, ema.timeline.last_update_step, ema.timeline.start_step) == (5, 4, 3)


def test_module_per_batch_costs_nothing_between_updates(monkeypatch):
    model = bn_net()
    ema = polyak.EMA(model, 0.9)
    module = ema.get_module()
    calls = []
    monkeypatch.setattr(ema._binding, "verify", lambda: calls.append(1))
    for _ in range(5):
        assert ema.get_module() is module  # an eval loop: no check, no reduction
    assert calls == []
    ema.update()
    assert ema.get_module() is module and calls == [1]  # checked again after an update
