"""polyak.EMA's guarantees: all-or-nothing mutations, model changes and non-finite values never
silent, misuse caught. Each test injects the failure and checks that nothing changed."""

from __future__ import annotations

import copy
import gc
import pickle
import re
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import polyak
from polyak import schedules
from torch_helpers import bn_net


def snapshot(ema: polyak.EMA) -> dict:
    """Everything an EMA holds, copied: averages, counters, schedules."""
    state = ema.state_dict()
    return {
        "averages": {k: {n: t.clone() for n, t in v.items()} for k, v in state["averages"].items()},
        "copied": {n: t.clone() for n, t in state["copied"].items()},
        "timeline": copy.deepcopy(state["timeline"]),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["timeline"] == b["timeline"]
    for key in ("averages", "copied"):
        ta = (
            a[key]
            if key == "copied"
            else {f"{k}/{n}": t for k, v in a[key].items() for n, t in v.items()}
        )
        tb = (
            b[key]
            if key == "copied"
            else {f"{k}/{n}": t for k, v in b[key].items() for n, t in v.items()}
        )
        assert ta.keys() == tb.keys()
        for n in ta:
            assert torch.equal(ta[n], tb[n]), n


def live(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {
        n: (t.data_ptr(), t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()
    }


def assert_live_same(model: nn.Module, before: dict) -> None:
    now = live(model)
    assert now.keys() == before.keys()
    for n, (ptr, value) in before.items():
        assert now[n][0] == ptr and torch.equal(now[n][1], value), n


def trained(decay=(0.9, 0.5), steps=3, **kw) -> tuple[nn.Module, polyak.EMA]:
    model = bn_net()
    ema = polyak.EMA(model, list(decay), **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        model(torch.randn(8, 5, generator=gen))
        ema.update()
    return model, ema


# ---------------------------------------------------------------- all or nothing
def test_swap_that_fails_midway_leaves_the_training_weights_and_no_swap(monkeypatch):
    model = bn_net().to(torch.bfloat16)  # fp32 averages: the swap makes cast copies
    ema = polyak.EMA(model, 0.9)
    before = live(model)
    real_to, calls = torch.Tensor.to, [0]

    def failing_to(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError("injected: out of memory for a cast copy")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(torch.OutOfMemoryError):
        ema.apply_shadow(model)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert_live_same(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.state_dict()  # no state-dict hook left behind
    ema.update()  # not swapped: update() works
    with ema.swapped(model):
        pass
    assert_live_same(model, before)


def test_swap_that_fails_while_exchanging_puts_back_what_was_exchanged(monkeypatch):
    model = bn_net()
    ema = polyak.EMA(model, 0.9)
    before = live(model)
    from polyak._torch import swap

    original = swap.swap_in

    def exchange_then_fail(root, names, targets, sources, by_copy, params):
        class Boom(list):
            def __iter__(self):  # fails after two targets were exchanged
                for i, x in enumerate(list.__iter__(self)):
                    if i == 2:
                        raise RuntimeError("injected failure while exchanging")
                    yield x

        return original(root, names, targets, Boom(sources), by_copy, params)

    monkeypatch.setattr("polyak._torch.ema.swap_in", exchange_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        ema.apply_shadow(model)
    assert_live_same(model, before)


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (
            lambda s: s["averages"]["0.5"].__setitem__("0.bias", torch.zeros(8).to_sparse()),
            "0.bias",
        ),
        (
            lambda s: s["averages"]["0.5"].__setitem__("0.bias", torch.zeros(8, device="meta")),
            "0.bias",
        ),
        (
            lambda s: s["averages"]["0.5"].__setitem__("0.bias", torch.zeros(8, dtype=torch.int64)),
            "0.bias",
        ),
        (
            lambda s: s["averages"]["0.5"].__setitem__("0.bias", torch.zeros(8, dtype=torch.bool)),
            "0.bias",
        ),
        (
            lambda s: s["averages"]["0.5"].__setitem__(
                "0.bias", torch.zeros(8, dtype=torch.cfloat)
            ),
            "0.bias",
        ),
        (lambda s: s["averages"]["0.5"]["0.bias"].__setitem__(3, float("nan")), "0.bias"),
        (lambda s: s["averages"]["0.5"].__setitem__("module.0.bias", torch.zeros(8)), "'0.bias'"),
        (
            lambda s: s["copied"].__setitem__("1.num_batches_tracked", torch.zeros(())),
            "num_batches",
        ),
        (lambda s: s["timeline"].__setitem__("last_decays", [0.9]), "last_decays"),
        (lambda s: s["timeline"].__setitem__("last_decays", [0.9, 1.5]), "last_decays"),
        (lambda s: s["timeline"].__setitem__("last_update_step", 99), "last_update_step=99"),
        (lambda s: s["timeline"].__setitem__("num_updates", 99), "num_updates=99"),
        (lambda s: s["timeline"]["schedules"]["0.5"].__setitem__("kind", "warmup"), "warmup"),
        (lambda s: s.pop("timeline"), "'timeline'"),
        (lambda s: s.pop("copied"), "'copied'"),
        (lambda s: s.pop("averages"), "'averages'"),
        (lambda s: s.__setitem__("averages", [1, 2]), "'averages' must be a mapping"),
    ],
)
def test_a_bad_checkpoint_changes_nothing(spoil, named):
    _, ema = trained()
    state = ema.state_dict()
    bad = {**state, "averages": {k: dict(v) for k, v in state["averages"].items()}}
    bad["copied"] = dict(state["copied"])
    bad["timeline"] = copy.deepcopy(state["timeline"])
    bad["averages"]["0.5"] = {n: t.clone() for n, t in bad["averages"]["0.5"].items()}
    spoil(bad)
    before = snapshot(ema)
    with pytest.raises((ValueError, TypeError)) as info:
        ema.load_state_dict(bad)
    assert named in str(info.value)  # the message names what is wrong
    assert_same(snapshot(ema), before)


def test_the_second_of_several_schedules_failing_loads_none():
    model = bn_net()
    decay = {
        "a": schedules.halflife(samples=1000, batch_size=10),
        "b": schedules.halflife(samples=1000, batch_size=10),
    }
    ema = polyak.EMA(model, decay)
    ema.update()
    state = copy.deepcopy(ema.state_dict())
    state["timeline"]["schedules"]["a"]["batch_size"] = 20
    state["timeline"]["schedules"]["b"]["batch_size"] = -1.0
    state["timeline"]["step"] = 5
    with pytest.raises(ValueError, match="batch_size"):
        ema.load_state_dict(state)
    assert ema.step == 1
    assert decay["a"].batch_size == 10  # the first schedule was not loaded either


def test_a_failure_while_staging_a_load_changes_nothing(monkeypatch):
    _, ema = trained()
    state = {**ema.state_dict()}
    state["averages"] = {
        k: {n: t.double() + 1 for n, t in v.items()} for k, v in state["averages"].items()
    }  # float64: staging casts every tensor
    before = snapshot(ema)
    real_to, calls = torch.Tensor.to, [0]

    def failing_to(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise torch.OutOfMemoryError("injected")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(torch.OutOfMemoryError):
        ema.load_state_dict(state)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert_same(snapshot(ema), before)


def test_rejected_update_with_another_model_leaves_the_binding():
    model, ema = trained()
    before = snapshot(ema)
    other = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 4))
    with pytest.raises(ValueError, match=r"3\.weight: the model has shape \(4, 7\)"):
        ema.update(other)
    with pytest.raises(ValueError, match="missing"):
        ema.update(nn.Linear(5, 8))
    assert ema.model is model
    assert_same(snapshot(ema), before)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()  # still follows the original model
    assert not torch.equal(
        ema.averaged_tensors("0.9")["0.weight"], before["averages"]["0.9"]["0.weight"]
    )


def test_deleting_an_ema_while_swapped_gives_the_weights_back():
    model = bn_net()
    ema = polyak.EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    before = live(model)
    ema.apply_shadow(model)
    assert not torch.equal(model[0].weight, before["0.weight"][1])
    with pytest.warns(UserWarning, match="garbage-collected while its average was swapped"):
        del ema
        gc.collect()
    assert_live_same(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.state_dict()  # the hook is gone too


def test_train_with_ema_refuses_an_ema_of_another_model():
    from torch.utils.data import DataLoader, TensorDataset

    model, other = nn.Linear(3, 1), nn.Linear(3, 1)
    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another model"):
        polyak.train_with_ema(model, data, data, opt, nn.MSELoss(), 1, ema=polyak.EMA(other))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_train_with_ema_never_copies_a_non_finite_average():
    from torch.utils.data import DataLoader, TensorDataset

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)
            self.spare = nn.Parameter(torch.zeros(2))  # not in the forward: the glitch stays here

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    class Glitch(torch.optim.SGD):
        """An optimizer whose third step leaves an inf in a weight, fixed at the next."""

        calls = 0

        def step(self, closure=None):
            out = super().step(closure)
            Glitch.calls += 1
            with torch.no_grad():
                if Glitch.calls in (3, 4):
                    model.spare[0] = float("inf") if Glitch.calls == 3 else 0.0
            return out

    torch.manual_seed(0)
    model = Model()
    data = DataLoader(TensorDataset(torch.randn(16, 3), torch.randn(16, 1)), batch_size=4)
    opt = Glitch(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        polyak.train_with_ema(model, data, data, opt, nn.MSELoss(), 2)
    assert any("keeps its live weights" in str(w.message) for w in caught)
    assert torch.isfinite(model.spare).all() and model.spare[0] == 0.0  # the live weights


# ---------------------------------------------------------------- the model changes
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)


def test_a_replaced_head_is_named_and_rebind_keeps_the_rest():
    model = Net()
    ema = polyak.EMA(model, 0.5)
    with torch.no_grad():
        model.body.weight.add_(1.0)
    ema.update()
    body = ema.averaged_tensors()["body.weight"].clone()
    model.head = nn.Linear(6, 3)  # same shapes, a freshly initialised module
    with pytest.raises(polyak.ModelChangedError, match="replaced by a new module") as info:
        ema.update()
    assert info.value.replaced == ["head.bias", "head.weight"]
    report = ema.rebind()
    assert report == {
        "kept": ["body.weight", "body.bias"],
        "new": ["head.weight", "head.bias"],
        "dropped": [],
    }
    assert torch.equal(ema.averaged_tensors()["body.weight"], body)
    assert torch.equal(ema.averaged_tensors()["head.weight"], model.head.weight)
    ema.update()
    with ema.swapped(model):  # the new head is swapped too
        assert model.head.weight.data_ptr() == ema.averaged_tensors()["head.weight"].data_ptr()


def test_a_new_head_of_another_shape_and_added_and_removed_tensors():
    model = Net()
    ema = polyak.EMA(model, 0.5)
    model.head = nn.Linear(6, 10)
    model.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(polyak.ModelChangedError) as info:
        ema.update()
    assert info.value.added == ["extra"] and info.value.replaced == ["head.bias", "head.weight"]
    model.head.bias = None  # a parameter set to None is removed
    with pytest.raises(polyak.ModelChangedError) as info:
        ema.update()
    assert "head.bias" in info.value.removed
    report = ema.rebind(model)
    assert report["dropped"] == ["head.bias"] and set(report["new"]) == {"head.weight", "extra"}
    ema.update()
    assert list(ema.averaged_tensors()) == [n for n, _ in model.named_parameters()]
    assert "head.bias" not in list(ema.averaged_tensors())


@pytest.mark.parametrize("shape", [(1, 4), (4,), (7, 4)])
def test_data_of_another_shape_is_never_broadcast(shape):
    model = Net()
    ema = polyak.EMA(model, 0.5)
    before = snapshot(ema)
    model.body.weight.data = torch.ones(shape)
    with pytest.raises(polyak.ModelChangedError, match=r"resized \['body.weight \(6, 4\) ->"):
        ema.update()
    assert_same(snapshot(ema), before)


def test_new_data_of_the_same_shape_dtype_or_device_is_followed():
    model = Net()
    ema = polyak.EMA(model, 0.5)
    model.body.weight.data = torch.full((6, 4), 2.0)
    ema.update()
    expected = Net().body.weight.lerp(torch.full((6, 4), 2.0), 0.5)
    assert torch.equal(ema.averaged_tensors()["body.weight"], expected)
    model.double()  # the average keeps its float32: a staged cast from now on
    ema.update()
    step2 = expected.lerp(torch.full((6, 4), 2.0), 0.5)
    assert ema.averaged_tensors()["body.weight"].dtype == torch.float32
    assert torch.equal(ema.averaged_tensors()["body.weight"], step2)
    model.to(torch.bfloat16)
    ema.update()
    assert torch.equal(
        ema.averaged_tensors()["body.weight"], step2.lerp(torch.full((6, 4), 2.0), 0.5)
    )


def test_a_deleted_tensor_is_found_before_a_swap_or_copy():
    model = Net()
    ema = polyak.EMA(model, 0.5)
    del model.head.bias  # no registration hook sees this; the watched parameter dict does
    with pytest.raises(polyak.ModelChangedError, match=r"removed \['head.bias'\]"), ema.swapped():
        pass
    with pytest.raises(polyak.ModelChangedError):
        ema.copy_to(model)


@pytest.mark.parametrize("how", ["set None", "del", "buffer None"])
def test_a_tensor_set_to_none_or_deleted_is_named_at_the_next_update(how):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = polyak.EMA(model, 0.5)
    ema.update()
    before = {k: v.clone() for k, v in ema.averaged_tensors().items()}
    if how == "set None":
        model[0].bias = None
    elif how == "del":
        del model[0].weight
    else:
        model[1].running_mean = None
    name = {"set None": "0.bias", "del": "0.weight", "buffer None": "1.running_mean"}[how]
    with pytest.raises(polyak.ModelChangedError, match=rf"removed \['{re.escape(name)}'\]"):
        ema.update()
    for k, v in ema.averaged_tensors().items():
        assert torch.equal(v, before[k])
    assert ema.rebind()["dropped"] == [name]
    ema.update()


def test_the_watched_parameter_dicts_leave_copies_pickles_and_compile_alone():
    model = Net()
    ema = polyak.EMA(model, 0.5)
    assert type(model.head._parameters) is not dict  # watched
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(type(m._parameters) is dict for m in clone.modules())
    x = torch.randn(2, 4)
    explained = torch._dynamo.explain(lambda x: model.head(model.body(x)))(x)
    assert explained.graph_break_count == 0
    ema.update()  # nothing changed: no error


def test_averages_on_the_meta_device_are_refused_by_name():
    with pytest.raises(ValueError, match="device='meta'.*pass device=None"):
        polyak.EMA(Net(), 0.5, device="meta")


def test_decay_one_warns_that_the_average_never_moves():
    with pytest.warns(UserWarning, match=r"decay 1\.0 \(averages \['frozen'\]\).*never moves"):
        polyak.EMA(Net(), {"frozen": 1.0, "moving": 0.9})
    with pytest.warns(UserWarning, match="never moves") as caught:
        polyak.ArrayEMA([np.zeros(2)], 1.0)
    assert caught[0].filename == __file__  # points at the caller's line


def test_a_meta_model_waits_for_its_weights():
    with torch.device("meta"):
        model = Net()
    ema = polyak.EMA(model, 0.5)
    assert "not built" in repr(ema)
    with pytest.raises(ValueError, match="body.weight is on the meta device"):
        ema.update()
    with pytest.raises(ValueError, match="meta device"):
        ema.state_dict()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.25)
    ema.update()
    assert ema.averaged_tensors()["body.weight"].device.type == "cpu"
    assert torch.equal(ema.averaged_tensors()["body.weight"], torch.full((6, 4), 0.25))


def test_flat_params_sees_replaced_data_through_the_buffer_use_count():
    model = Net()
    ema = polyak.EMA(model, 0.5, flat_params=True)
    model.body.weight.data = torch.ones(1, 4)  # broadcastable to (6, 4)
    with pytest.raises(polyak.ModelChangedError, match="resized"):
        ema.update()


# ---------------------------------------------------------------- non-finite values
def poison(model: nn.Module) -> None:
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
        model[3].bias[1] = float("nan")


def test_nonfinite_raise_names_the_tensors_and_changes_nothing():
    model, ema = trained(nonfinite="raise")
    before = snapshot(ema)
    poison(model)
    with pytest.raises(polyak.NonFiniteError, match=r"\['0.weight', '3.bias'\]") as info:
        ema.update()
    assert info.value.names == ["0.weight", "3.bias"]
    assert_same(snapshot(ema), before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"flat_params": True},
        {"buffers": "copy"},
        {"dtype": torch.bfloat16, "stochastic_rounding": True},
    ],
)
@pytest.mark.parametrize("bf16_model", [False, True])
def test_nonfinite_skip_leaves_the_averages_and_counts(kwargs, bf16_model):
    warnings.simplefilter("ignore")
    model = bn_net().to(torch.bfloat16) if bf16_model else bn_net()
    ema = polyak.EMA(model, [0.9, schedules.uniform()], nonfinite="skip", **kwargs)
    twin = polyak.EMA(copy.deepcopy(model), [0.9, schedules.uniform()], **kwargs)
    ema.update()
    twin.update()
    before = snapshot(ema)
    saved = copy.deepcopy(model.state_dict())
    poison(model)
    ema.update()
    assert_same({**snapshot(ema), "timeline": None}, {**before, "timeline": None})
    assert ema.step == 2 and ema.skipped_updates == 1
    model.load_state_dict(saved)
    ema.update()
    twin.update(steps=2)  # a skipped update is one with decay 1: the next covers the gap
    for name in ema.names:
        for n, t in ema.averaged_tensors(name).items():
            if "stochastic_rounding" not in kwargs:
                assert torch.equal(t, twin.averaged_tensors(name)[n]), (name, n)
            assert torch.isfinite(t.double()).all()


def test_propagate_reports_a_non_finite_average_when_it_is_handed_out():
    model, ema = trained(decay=(0.9,))
    poison(model)
    ema.update()
    assert ema.nonfinite_tensors() == ["0.weight", "3.bias"]
    with pytest.warns(UserWarning, match=r"inf/nan in \['0.weight', '3.bias'\]"), ema.swapped():
        pass
    with pytest.warns(UserWarning, match="inf/nan"):
        ema.state_dict()
    with pytest.warns(UserWarning, match="inf/nan"):
        _ = ema.get_module()
    target = bn_net()
    before = live(target)
    with pytest.raises(polyak.NonFiniteError, match="nothing was copied"):
        ema.copy_to(target)
    assert_live_same(target, before)


# ---------------------------------------------------------------- misuse
def test_training_inside_swapped_is_caught():
    model = bn_net()
    ema = polyak.EMA(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = live(model)
    with (
        pytest.raises(RuntimeError, match=r"written while the average was swapped in"),
        ema.swapped(),
    ):
        model(torch.randn(4, 5)).sum().backward()
        opt.step()
    assert_live_same(model, before)  # the training weights are back
    with pytest.warns(UserWarning, match="written while"), pytest.raises(KeyError), ema.swapped():
        opt.step()
        raise KeyError("the block's own error wins")
    with ema.swapped(model):  # evaluation, even recomputing BN statistics, is fine
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 5))


def test_updates_from_two_threads_are_all_counted():
    model = bn_net()
    ema = polyak.EMA(model, 0.99)
    n = 300

    def work() -> None:
        for _ in range(n):
            ema.update()

    threads = [threading.Thread(target=work) for _ in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a busy program would
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert ema.step == 2 * n and ema.timeline.num_updates == 2 * n


def test_an_average_named_copied_loads_its_own_checkpoint():
    model = bn_net()
    ema = polyak.EMA(model, {"copied": 0.9, "other": 0.5})
    ema.update()
    fresh = polyak.EMA(bn_net(), {"copied": 0.9, "other": 0.5})
    fresh.load_state_dict(ema.state_dict())
    for n, t in ema.averaged_tensors("copied").items():
        assert torch.equal(fresh.averaged_tensors("copied")[n], t)


def test_a_state_dict_that_is_not_a_mapping_is_named():
    ema = polyak.EMA(bn_net(), 0.9)
    with pytest.raises(TypeError, match="must be a mapping, got list"):
        ema.load_state_dict([1, 2])


def test_low_precision_warning_states_the_factor():
    with pytest.warns(UserWarning, match=r"more than ~0.49x its size"):
        polyak.EMA(bn_net(), 0.9, dtype=torch.float16)
    with pytest.warns(UserWarning, match=r"more than ~3.9x its size"):
        polyak.EMA(bn_net(), 0.9, dtype=torch.bfloat16)


def test_bad_nonfinite_option():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        polyak.EMA(bn_net(), 0.9, nonfinite="ignore")


def test_low_precision_sums_do_not_overflow_into_false_alarms():
    """A float16 sum of finite values overflows past 65504: the checks reduce in float32."""
    big = nn.Linear(1000, 1000)
    with torch.no_grad():
        big.weight.fill_(100.0)  # sum 1e8, L2 norm 1e5: both beyond float16's range
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema = polyak.EMA(big, 0.9, dtype=torch.float16)
        ema.update()
        ema.state_dict()
    assert not [w for w in caught if "inf/nan" in str(w.message)]
    assert ema.nonfinite_tensors() == []
    for flat in (False, True):
        model = copy.deepcopy(big).half()
        for mode in ("raise", "skip"):
            e = polyak.EMA(model, 0.9, nonfinite=mode, flat_params=flat)
            e.update()  # raises on a false alarm
            assert e.skipped_updates == 0
