"""The fast update paths give the numbers of the reference path, allocate nothing, and the
opt-in modes (flat parameters, bf16 with stochastic rounding) keep their promises."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import polyak
from polyak import schedules
from polyak._torch import groups as kernels
from polyak._torch.rounding import seed_for, stochastic_round_
from torch_helpers import Tied, bn_net


class Mixed(nn.Module):
    """Large and small tensors, a channels_last conv, BN buffers, a scalar parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 16)
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv.weight.data = self.conv.weight.data.to(memory_format=torch.channels_last)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(16, 40)
        self.scale = nn.Parameter(torch.tensor(0.5))


def _reference(model: nn.Module, decays, steps, dtype=torch.float32):
    """The naive path: a per-tensor lerp of every average, cast live -> average dtype."""
    lives = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    avgs = [[t.detach().to(dtype).clone() for t in lives] for _ in decays]
    return lives, avgs


def _reference_update(lives, avgs, decays):
    with torch.no_grad():
        for row, d in zip(avgs, decays):
            for a, t in zip(row, lives):
                if d == 1.0:
                    continue
                if d == 0.0:
                    a.copy_(t)
                else:
                    a.lerp_(t.to(a.dtype), 1.0 - d)


def _move(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_((0.1 * torch.randn(t.shape, generator=gen)).to(t.dtype))
            else:
                t.add_(1)


def _named_floats(model: nn.Module) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    return names + [n for n, b in model.named_buffers() if b.is_floating_point()]


def _run_against_reference(model, decay_lists, *, flat=False, dtype=None, steps=6):
    gen = torch.Generator().manual_seed(0)
    ref_model = copy.deepcopy(model)
    ref_dtype = dtype or torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ema = polyak.EMA(model, [float(d[0]) for d in decay_lists], flat_params=flat)
    lives, avgs = _reference(ref_model, decay_lists, steps, ref_dtype)
    for step in range(steps):
        gen_state = gen.get_state()
        _move(model, gen)
        gen.set_state(gen_state)
        _move(ref_model, gen)
        decays = [float(d[step % len(d)]) for d in decay_lists]
        ema._binding.check()
        ema._binding.apply(tuple(decays), step)
        _reference_update(lives, avgs, decays)
    names = _named_floats(ref_model)
    for k, name in enumerate(ema.names):
        got = ema.averaged_tensors(name)
        for n, a in zip(names, avgs[k]):
            assert torch.equal(got[n], a), (name, n)
    return ema


DECAYS = [[0.9, 0.5, 0.99], [0.999, 0.0, 0.7], [0.5, 1.0, 0.25]]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("block", [64, 1 << 17])
def test_float32_paths_equal_reference_bit_for_bit(k, flat, block, monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK", block)
    torch.manual_seed(0)
    ema = _run_against_reference(Mixed(), DECAYS[:k], flat=flat)
    group = ema._binding.groups[0]
    assert group.fused == (k > 1)
    if block == 64 and k > 1:
        assert len(group.block_avg) > len(group.rows[0])  # big tensors were cut into blocks


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("chunk", [50, 1 << 18])
def test_bf16_model_staged_paths_equal_reference(k, flat, chunk, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", chunk)
    torch.manual_seed(0)
    model = Mixed().to(torch.bfloat16)
    ema = _run_against_reference(model, DECAYS[:k], flat=flat)
    assert any(isinstance(g, kernels.StagedGroup) for g in ema._binding.groups)


def test_flat_params_makes_one_kernel_and_keeps_the_model_working():
    torch.manual_seed(0)
    model, twin = bn_net(), bn_net()
    ema = polyak.EMA(model, 0.9, flat_params=True)
    assert [g.launches for g in ema._binding.groups] == [1]  # params + BN stats: one lerp
    assert [g.launches for g in ema._binding.copy_groups] == [1]
    storages = {t.untyped_storage().data_ptr() for t in model.parameters()}
    assert len(storages) == 1
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)  # same values, same names
    # an optimizer built before or after sees the same Parameter objects; training is identical
    opt, opt_twin = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, twin))
    ema_twin = polyak.EMA(twin, 0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 5, generator=gen)
        for m, o, e in ((model, opt, ema), (twin, opt_twin, ema_twin)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
            e.update()
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    for n, v in ema.averaged_tensors().items():
        assert torch.equal(v, ema_twin.averaged_tensors()[n]), n
    # state_dict save/load round trip
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = bn_net(seed=5)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    model.load_state_dict(fresh.state_dict())  # copies into the views: still flat
    assert len({t.untyped_storage().data_ptr() for t in model.parameters()}) == 1


def test_flat_params_keeps_weight_tying_and_follows_to_and_replaced_data():
    model = Tied()
    ema = polyak.EMA(model, 0.5, flat_params=True)
    assert model.head.weight is model.emb.weight
    assert (
        model.emb.weight.untyped_storage().data_ptr()
        == model.head.weight.untyped_storage().data_ptr()
    )
    model.to("cpu")  # a no-op move keeps the layout
    ema.update()
    assert ema._binding.groups[0].launches == 1
    model.double()  # new scattered float64 tensors: flattened again at the next update
    ema.update()
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    assert model.emb.weight.dtype == torch.float64
    # replace one tensor's data behind the EMA's back: the next update must use it
    with torch.no_grad():
        model.emb.weight.data = torch.full_like(model.emb.weight, 3.0)
    before = ema.averaged_tensors()["emb.weight"].clone()
    ema.update()
    expected = before.double().lerp(torch.full_like(before, 3.0, dtype=torch.float64), 0.5)
    torch.testing.assert_close(ema.averaged_tensors()["emb.weight"].double(), expected)


def test_flat_params_swapped_and_warns_where_it_cannot_apply():
    torch.manual_seed(0)
    model = Mixed()
    with pytest.warns(UserWarning, match=r"conv.weight \(not contiguous"):
        ema = polyak.EMA(model, 0.9, flat_params=True)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)  # untouched
    live = model.fc.weight.detach().clone()
    with ema.swapped(model):
        pass
    assert torch.equal(model.fc.weight, live)
    ema.update()
    assert sum(g.launches for g in ema._binding.groups) < 8


def test_flat_params_training_through_torch_compile():
    torch.manual_seed(0)
    model, twin = bn_net(), bn_net()
    polyak.EMA(model, 0.9, flat_params=True)
    compiled = torch.compile(model, backend="aot_eager")
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin))
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(8, 5, generator=gen)
        for m, o in ((compiled, opt), (twin, opt_twin)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_several_averages_fused_equal_separate_emas_bit_for_bit_with_schedules():
    decays = [0.9, schedules.warmup(0.99), schedules.power(gamma=7.0), schedules.uniform()]
    model = Mixed()
    multi = polyak.EMA(model, decays)
    singles = [polyak.EMA(model, d) for d in decays]
    assert multi._binding.groups[0].fused
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        _move(model, gen)
        multi.update()
        for s in singles:
            s.update()
    for name, s in zip(multi.names, singles):
        for n, v in s.averaged_tensors().items():
            assert torch.equal(multi.averaged_tensors(name)[n], v), (name, n)


_SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero")


def _allocated(fn) -> int:
    """Bytes allocated by ``fn`` (profiler memory events); also asserts that it reads no
    tensor value back on the host (the ops that would sync with a GPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    assert not [e.name for e in events if e.name in _SYNCS]
    return sum(max(0, e.self_cpu_memory_usage) for e in events)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"flat_params": True},
        {"decay": [0.9, 0.99, 0.999]},
        {"decay": [0.9, 0.99], "flat_params": True},
        {"bf16_model": True},
        {"bf16_model": True, "decay": [0.9, 0.99]},
        {"dtype": torch.bfloat16, "stochastic_rounding": True},
    ],
)
def test_an_update_allocates_nothing(kwargs):
    kwargs = dict(kwargs)
    model = Mixed()
    if kwargs.pop("bf16_model", False):
        model = model.to(torch.bfloat16)
    decay = kwargs.pop("decay", 0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ema = polyak.EMA(model, decay, **kwargs)
    gen = torch.Generator().manual_seed(0)
    ema.update()
    _move(model, gen)
    ema.update()  # weights set once: later updates reuse them
    assert _allocated(ema.update) == 0
    decay2 = [d * 0.5 for d in decay] if isinstance(decay, list) else decay * 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ema2 = polyak.EMA(model, decay2, **kwargs) if not kwargs.get("dtype") else None
    if ema2 is not None:  # changing decays refills the weights in place
        ema2.update()
        assert _allocated(ema2.update) == 0


def test_profiler_sees_an_allocating_update_and_a_host_read():
    a, b = torch.zeros(1000), torch.ones(1000)
    assert _allocated(lambda: a.sub_(0.1 * (a - b))) >= 2 * 4000
    with pytest.raises(AssertionError):
        _allocated(lambda: a.sum().item())


# ----------------------------------------------------------------------- stochastic rounding
def test_stochastic_round_is_unbiased_and_exact_on_the_grid():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    # 1 + 2**-10 lies a quarter of the way between bf16 neighbours 1 and 1 + 2**-7 ... 1/8
    for x in (1 + 2**-10, -(1 + 3 * 2**-10), 3.0e-3 * (1 + 2**-9), 1.0, 0.0):
        value = torch.full((n,), x, dtype=torch.float32)
        noise = torch.empty(n, dtype=torch.int32)
        out = stochastic_round_(value, noise, gen).to(torch.bfloat16)
        vals = out.double()
        values = vals.unique()
        assert len(values) <= 2  # the two bf16 neighbours of x
        assert torch.equal(values.bfloat16().double(), values)
        assert ((values - x).abs() <= abs(x) * 2**-7).all()
        mean = vals.mean().item()
        ulp = abs(x) * 2**-7 if x else 0.0
        assert abs(mean - x) <= 5 * ulp / n**0.5 + 1e-12, (x, mean)
        if x in (1.0, 0.0):
            assert torch.all(vals == x)


def test_stochastic_round_keeps_inf_and_nan():
    gen = torch.Generator().manual_seed(0)
    value = torch.tensor([float("inf"), float("-inf"), float("nan")] * 100)
    out = stochastic_round_(value.clone(), torch.empty(300, dtype=torch.int32), gen)
    assert torch.isposinf(out[0::3]).all() and torch.isneginf(out[1::3]).all()
    assert torch.isnan(out[2::3]).all()


def _bf16_sr_ema(seed=0, model=None):
    model = model or nn.Linear(64, 64)
    return model, polyak.EMA(
        model, 0.999, dtype=torch.bfloat16, stochastic_rounding=True, seed=seed
    )


def test_bf16_sr_moves_where_round_to_nearest_freezes_and_tracks_float64():
    model = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    _, sr = _bf16_sr_ema(model=model)
    with pytest.warns(UserWarning, match="ulp"):
        rtn = polyak.EMA(model, 0.999, dtype=torch.bfloat16)
    exp = 1.0
    with torch.no_grad():
        model.weight.fill_(1.5)
    with pytest.warns(UserWarning, match="freezes"):
        rtn.update()
    sr.update()
    exp = 0.999 * exp + 0.001 * 1.5
    for _ in range(1999):
        rtn.update()
        sr.update()
        exp = 0.999 * exp + 0.001 * 1.5
    got = sr.averaged_tensors()["weight"].double()
    assert torch.all(rtn.averaged_tensors()["weight"] == 1.0)  # frozen
    # unbiased: the mean of 4096 weights is on target; each weight is noisy (a few bf16 ulps,
    # 2**-7 here), where round-to-nearest is off by 0.43
    assert abs(got.mean().item() - exp) < 3e-3
    assert (got - exp).std().item() < 0.05
    assert (got - exp).abs().max().item() < 0.2


def test_bf16_sr_is_seeded_identical_across_ranks_and_resumes_exactly():
    gen = torch.Generator().manual_seed(4)
    m1, a = _bf16_sr_ema(seed=7, model=bn_net())
    m2, b = _bf16_sr_ema(seed=7, model=bn_net())  # another "rank": same seed, same weights
    _, c = _bf16_sr_ema(seed=8, model=bn_net())
    for _ in range(5):
        g_state = gen.get_state()
        _move(m1, gen)
        gen.set_state(g_state)
        _move(m2, gen)
        a.update()
        b.update()
        c.update(m1)
    for n, v in a.averaged_tensors().items():
        assert torch.equal(v, b.averaged_tensors()[n])
    assert any(not torch.equal(v, c.averaged_tensors()[n]) for n, v in a.averaged_tensors().items())
    # resume: a fresh EMA loaded from the state dict continues bit for bit
    state = copy.deepcopy(a.state_dict())
    _, resumed = _bf16_sr_ema(seed=7, model=m1)
    resumed.load_state_dict(state)
    for _ in range(3):
        _move(m1, gen)
        a.update()
        resumed.update()
    for n, v in a.averaged_tensors().items():
        assert torch.equal(v, resumed.averaged_tensors()[n])
    assert seed_for(7, 1, 0) != seed_for(7, 2, 0) != seed_for(8, 1, 0)


def test_new_options_are_validated():
    with pytest.raises(ValueError, match="dtype=torch.bfloat16"):
        polyak.EMA(bn_net(), stochastic_rounding=True)
    with pytest.raises(TypeError, match="flat_params"):
        polyak.EMA(bn_net(), flat_params=1)
    with pytest.raises(ValueError, match="seed"):
        polyak.EMA(bn_net(), dtype=torch.bfloat16, stochastic_rounding=True, seed=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SR storage does not freeze: no freeze warning
        _, ema = _bf16_sr_ema()
        ema.update()


# ----------------------------------------------------------------------- compiled kernel
def test_compiled_update_equals_eager_bit_for_bit_and_allocates_nothing():
    """Bit for bit on the torch CI tests (2.13); on torch 2.6, the oldest polyak declares, its
    Inductor's kernel differs from eager ``lerp_`` by up to 2 ulp (found by that CI job)."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    exact = version >= (2, 13)
    gen = torch.Generator().manual_seed(5)
    for dtype, decays in ((torch.float32, [0.9, 0.99, 0.5]), (torch.bfloat16, [0.999])):
        torch.manual_seed(0)
        model = bn_net().to(dtype)
        twin = copy.deepcopy(model)
        fast = polyak.EMA(model, decays, flat_params=True, compile_update=True)
        slow = polyak.EMA(twin, decays)
        assert fast._binding.groups[0].compiled is not None
        for _ in range(4):
            state = gen.get_state()
            _move(model, gen)
            gen.set_state(state)
            _move(twin, gen)
            fast.update()
            slow.update()
        for name in fast.names:
            for n, v in slow.averaged_tensors(name).items():
                got = fast.averaged_tensors(name)[n]
                if exact:
                    assert torch.equal(got, v), (dtype, name, n)
                else:
                    torch.testing.assert_close(got, v, rtol=2**-22, atol=0)  # 1-2 ulp
        assert _allocated(fast.update) == 0
    # decays of 0 and 1 (copy, skip) take the eager path
    ema = polyak.EMA(bn_net(), [schedules.uniform(), 0.9], flat_params=True, compile_update=True)
    ema.update()  # uniform's first decay is 0: a copy
    assert ema.timeline.last_decays[ema.names[0]] == 0.0


def test_compiled_update_without_flat_weights_warns_and_stays_eager():
    with pytest.warns(UserWarning, match="flat_params=True"):
        ema = polyak.EMA(bn_net(), [0.9, 0.99], compile_update=True)
    assert ema._binding.groups[0].compiled is None
