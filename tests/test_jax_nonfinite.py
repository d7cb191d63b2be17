"""One non-finite policy for every backend: ``polyak.EMA``, ``ArrayEMA`` and ``polyak.jax`` fed
the same stream with an inf/nan in the middle give the same averages, skipped counts, errors and
warnings, checked against a float64 loop. Then what is particular to JAX: ``"raise"`` inside
``jax.jit``, no transfer to the host in ``"skip"``, the hand-out points, loading."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="polyak.jax needs JAX: pip install 'polyak[jax]'")
jnp = jax.numpy

import polyak  # noqa: E402
import polyak.jax as pj  # noqa: E402
from polyak import schedules as S  # noqa: E402

SHAPES = {"weight": (3, 2), "bias": (3,)}
STEPS = 10
BAD_STEP = 6  # the optimizer step whose weights hold the inf/nan


def stream(bad: float, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    values = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)
    ]
    values[BAD_STEP - 1]["weight"][1, 0] = bad
    return values


def reference(
    init: dict[str, np.ndarray],
    values: list[dict[str, np.ndarray]],
    schedule: S.Schedule,
    update_every: int,
    skip_bad: bool,
    skip: tuple[int, ...] = (),
) -> dict[str, np.ndarray]:
    """Float64 loop: at each due step t the decay over the gap; a skipped update (inf/nan with
    ``skip_bad``, or a step in ``skip``) leaves the average and still counts as the last update
    (the schedule's clock runs on)."""
    avg = {k: v.astype(np.float64) for k, v in init.items()}
    last = 0
    for t, v in enumerate(values, start=1):
        if t - last < update_every:
            continue
        d = 1.0
        for j in range(last + 1, t + 1):
            d *= schedule.per_step(j)
        last = t
        bad = any(not np.isfinite(x).all() for x in v.values())
        if (bad and skip_bad) or t in skip:
            continue
        with np.errstate(invalid="ignore"):
            avg = {k: d * avg[k] + (1 - d) * v[k].astype(np.float64) for k in avg}
    return avg


class Net(torch.nn.Module):
    def __init__(self, init: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(init["weight"].copy()))
        self.bias = torch.nn.Parameter(torch.from_numpy(init["bias"].copy()))


class TorchRun:
    name_of = staticmethod(lambda n: n)

    def __init__(self, init, schedule, update_every, mode):
        self.net = Net(init)
        self.ema = polyak.EMA(self.net, schedule, update_every=update_every, nonfinite=mode)

    def update(self, v):
        with torch.no_grad():
            for k, x in v.items():
                getattr(self.net, k).copy_(torch.from_numpy(x))
        self.ema.update()

    def average(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.ema.state_dict()  # a hand-out point that warns
        avg = {k: t.detach().numpy().copy() for k, t in self.ema.averaged_tensors().items()}
        return avg, caught

    @property
    def skipped(self):
        return self.ema.skipped_updates

    @property
    def step(self):
        return self.ema.step


class ArrayRun:
    name_of = staticmethod(lambda n: f"[{n!r}]")

    def __init__(self, init, schedule, update_every, mode):
        self.ema = polyak.ArrayEMA(
            {k: x.copy() for k, x in init.items()},
            schedule,
            update_every=update_every,
            nonfinite=mode,
        )

    def update(self, v):
        self.ema.update(v)

    def average(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            avg = self.ema.get()
        return avg, caught

    @property
    def skipped(self):
        return self.ema.skipped_updates

    @property
    def step(self):
        return self.ema.step


class JaxRun:
    name_of = staticmethod(lambda n: f"[{n!r}]")

    def __init__(self, init, schedule, update_every, mode, jit=False):
        self.state = pj.init(
            {k: jnp.asarray(x) for k, x in init.items()},
            schedule,
            update_every=update_every,
            nonfinite=mode,
        )
        self.step_fn = jax.jit(pj.update) if jit else pj.update

    def update(self, v):
        self.state = self.step_fn(self.state, {k: jnp.asarray(x) for k, x in v.items()})

    def average(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            avg = {k: np.asarray(x) for k, x in pj.average(self.state).items()}
        return avg, caught

    @property
    def skipped(self):
        return int(self.state.skipped)

    @property
    def step(self):
        return int(self.state.step)


BACKENDS = {"torch": TorchRun, "numpy": ArrayRun, "jax": JaxRun}
SCHEDULE = S.warmup(0.9, period=3)


def assert_matches(avg, expected):
    for k, exp in expected.items():
        np.testing.assert_allclose(avg[k], exp, rtol=2e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("update_every", [1, 2])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_skip_leaves_the_bad_update_out_in_every_backend(backend, update_every, bad):
    values = stream(bad)
    init = stream(0.0, seed=1)[0]
    run = BACKENDS[backend](init, SCHEDULE, update_every, "skip")
    for v in values:
        run.update(v)
    avg, caught = run.average()
    due = BAD_STEP % update_every == 0  # with update_every=2 the bad weights are never read
    assert run.skipped == int(due) and run.step == STEPS
    assert_matches(avg, reference(init, values, SCHEDULE, update_every, skip_bad=True))
    assert all(np.isfinite(x).all() for x in avg.values()) == due and not caught


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_finite_weights_whose_float32_sum_overflows_are_left_out_by_every_update_gate(backend):
    """The gate is one sum in float32 per tensor in every backend (cheaper than an exact test):
    weights summing past 3.4e38 count as non-finite, alike in the three."""
    values, init = stream(0.0), stream(0.0, seed=1)[0]
    values[BAD_STEP - 1]["bias"][:] = 3e38  # finite, but 9e38 summed
    run = BACKENDS[backend](init, SCHEDULE, 1, "skip")
    for v in values:
        run.update(v)
    avg, caught = run.average()
    assert run.skipped == 1 and not caught
    assert_matches(avg, reference(init, values, SCHEDULE, 1, skip_bad=True, skip=(BAD_STEP,)))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_propagate_lets_the_nan_in_and_every_hand_out_warns_naming_the_tensor(backend):
    values, init = stream(np.nan), stream(0.0, seed=1)[0]
    run = BACKENDS[backend](init, SCHEDULE, 1, "propagate")
    for v in values[: BAD_STEP - 1]:
        run.update(v)
    assert not run.average()[1]  # no warning while the average is finite
    for v in values[BAD_STEP - 1 :]:
        run.update(v)
    avg, caught = run.average()
    assert_matches(avg, reference(init, values, SCHEDULE, 1, skip_bad=False))
    assert np.isnan(avg["weight"][1, 0]) and np.isfinite(avg["bias"]).all()
    assert run.skipped == 0
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "inf/nan" in messages[0]
    assert run.name_of("weight") in messages[0] and run.name_of("bias") not in messages[0]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_raise_names_the_tensor_and_changes_nothing_in_every_backend(backend):
    values, init = stream(np.inf), stream(0.0, seed=1)[0]
    run = BACKENDS[backend](init, SCHEDULE, 1, "raise")
    for v in values[: BAD_STEP - 1]:
        run.update(v)
    before, _ = run.average()
    with pytest.raises(polyak.NonFiniteError, match="inf/nan") as info:
        run.update(values[BAD_STEP - 1])
    assert info.value.names == [run.name_of("weight")]
    after, caught = run.average()
    assert run.step == BAD_STEP - 1 and run.skipped == 0 and not caught
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    expected = reference(init, values[: BAD_STEP - 1], SCHEDULE, 1, skip_bad=False)
    assert_matches(after, expected)


def test_raise_inside_jit_leaves_the_update_out_and_raises_at_the_first_call_outside():
    values, init = stream(np.nan), stream(0.0, seed=1)[0]
    run = JaxRun(init, SCHEDULE, 1, "raise", jit=True)
    skipping = JaxRun(init, SCHEDULE, 1, "skip", jit=True)
    for v in values:
        run.update(v)  # no exception can come out of a jitted call
        skipping.update(v)
    state = run.state
    assert int(state.skipped) == 1 and np.asarray(state.nonfinite_leaves).tolist() == [False, True]
    for call in (
        lambda: pj.average(state),
        lambda: pj.state_dict(state),
        lambda: pj.update(state, {k: jnp.asarray(x) for k, x in values[0].items()}),
    ):
        with pytest.raises(polyak.NonFiniteError, match=r"1 update inside a jax trans") as info:
            call()
        assert info.value.names == ["['weight']"]
    # the averages are those of "skip": the bad update never entered them
    for a, b in zip(jax.tree.leaves(state.averages), jax.tree.leaves(skipping.state.averages)):
        np.testing.assert_array_equal(a, b)


def test_skip_decides_on_the_device_without_a_transfer_to_the_host():
    values, init = stream(np.nan), stream(0.0, seed=1)[0]
    for mode in ("skip", "raise"):
        run = JaxRun(init, SCHEDULE, 1, mode, jit=True)
        params = [{k: jnp.asarray(x) for k, x in v.items()} for v in values]
        run.state = run.step_fn(run.state, params[0])  # compiles
        with jax.transfer_guard("disallow"):
            for p in params[1:]:
                run.state = run.step_fn(run.state, p)
        assert int(run.state.skipped) == 1


def test_swapped_warns_for_a_nonfinite_average_and_raises_a_pending_error():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
    state = pj.update(pj.init(params, 0.5), nan)
    match = r"swapped\(\): average '0.5' holds inf/nan"
    with pytest.warns(UserWarning, match=match) as rec, pj.swapped(model, state):
        pass
    assert rec[0].filename == __file__  # the warning points at the caller's line
    raising = jax.jit(pj.update)(pj.init(params, 0.5, nonfinite="raise"), nan)
    with pytest.raises(polyak.NonFiniteError, match="inside a jax"), pj.swapped(model, raising):
        pass


def test_state_dict_warns_and_load_refuses_a_nonfinite_state_naming_the_leaf():
    template = pj.init({"w": jnp.zeros(3), "b": jnp.zeros(1)}, {"a": 0.9})
    state = pj.update(template, {"w": jnp.array([1.0, jnp.nan, 0.0]), "b": jnp.ones(1)})
    with pytest.warns(
        UserWarning, match=r"state_dict\(\): average 'a' holds inf/nan at \[\"\['w'\]"
    ) as rec:
        sd = pj.state_dict(state)
    with pytest.warns(UserWarning, match=r"average\(\): average 'a'") as rec2:
        pj.average(state)
    assert rec[0].filename == rec2[0].filename == __file__
    with pytest.raises(polyak.NonFiniteError, match=r"a\['w'\] holds inf/nan") as info:
        pj.load_state_dict(template, sd)
    assert info.value.names == ["a['w']"]
    # a float64 value beyond float32 is inf once cast into the float32 average: refused too
    fine = pj.state_dict(pj.update(template, {"w": jnp.ones(3), "b": jnp.ones(1)}))
    fine["averages"]["a"][0] = np.array([1e39])  # leaves in key order: b, w
    with pytest.raises(polyak.NonFiniteError, match=r"a\['b'\] holds inf/nan \(as float32\)"):
        pj.load_state_dict(template, fine)


def test_the_skipped_count_survives_a_state_dict_and_the_raise_record_does_not():
    template = pj.init({"w": jnp.zeros(2)}, 0.9, nonfinite="skip")
    state = template
    for x in (1.0, jnp.nan, 2.0, jnp.inf):
        state = pj.update(state, {"w": jnp.full(2, x)})
    sd = pj.state_dict(state)
    assert sd["skipped_updates"] == 2
    back = pj.load_state_dict(template, sd)
    assert int(back.skipped) == 2 and not np.asarray(back.nonfinite_leaves).any()
    raising = pj.init({"w": jnp.zeros(2)}, 0.9, nonfinite="raise")
    assert int(pj.load_state_dict(raising, sd).skipped) == 2  # loads: nothing pending
    pj.average(pj.load_state_dict(raising, sd))
    old = {k: v for k, v in sd.items() if k != "skipped_updates"}  # written before the field
    assert int(pj.load_state_dict(template, old).skipped) == 0
    for bad in (-1, 5, 1.5, True, "2"):
        with pytest.raises(ValueError, match="skipped_updates must be an integer from 0"):
            pj.load_state_dict(template, {**sd, "skipped_updates": bad})


def test_ema_of_params_takes_the_mode():
    optax = pytest.importorskip("optax")
    params = {"w": jnp.ones(2)}
    tx = optax.chain(optax.sgd(1.0), pj.ema_of_params(0.5, nonfinite="skip"))
    opt_state = tx.init(params)
    _, opt_state = jax.jit(tx.update)({"w": jnp.array([jnp.nan, 0.0])}, opt_state, params)
    assert int(opt_state[1].skipped) == 1
    np.testing.assert_array_equal(pj.average(opt_state)["w"], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('propagate'"):
        pj.ema_of_params(0.9, nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        pj.init(params, 0.9, nonfinite=None)


@pytest.mark.slow
def test_the_gated_update_compiles_in_time_linear_in_the_leaves():
    """Without a barrier XLA tried to fuse every leaf's finiteness sum into every leaf's update:
    compile time grew with the square of the leaf count (42 s for 195 leaves)."""
    import time

    def compile_seconds(n):
        params = {f"w{i}": jnp.zeros(4) for i in range(n)}
        state = pj.init(params, 0.9, nonfinite="skip")
        start = time.perf_counter()
        jax.jit(pj.update).lower(state, params).compile()
        return time.perf_counter() - start

    compile_seconds(8)  # warm up the compiler
    small, large = compile_seconds(25), compile_seconds(125)
    assert large < 10 * small + 0.5, (small, large)  # 5x the leaves: ~5x linear, ~25x squared
