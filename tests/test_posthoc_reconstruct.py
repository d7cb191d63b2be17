"""Post-hoc reconstruction against averages kept directly during training (float64 references)."""

from __future__ import annotations

import itertools
import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import polyak
from polyak.posthoc import reader
from posthoc_helpers import Walk, exact_combination, flat, fp32_bound, small_model

STEPS = 2000
EVERY = (400, 200, 100, 50)  # 5, 10, 20, 40 snapshots of sigma_rel 0.05 and 0.10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One drifting random walk (2000 steps) seen by several stores and direct float64 EMAs."""
    root = tmp_path_factory.mktemp("posthoc")
    model = small_model()
    walk = Walk(model)
    direct = polyak.EMA(
        model,
        {
            "p08": polyak.schedules.power(sigma_rel=0.08),
            "d995": polyak.schedules.debiased(0.995),
            "p05": polyak.schedules.power(sigma_rel=0.05),
        },
        dtype=torch.float64,
    )
    stores = {
        e: polyak.PostHocEMA(
            model, root / f"fp32-{e}", snapshot_every=e, snapshot_dtype=torch.float32
        )
        for e in EVERY
    }
    stores["fp16"] = polyak.PostHocEMA(model, root / "fp16", snapshot_every=100)
    stores["live"] = polyak.PostHocEMA(
        model, root / "live", snapshot_every=100, snapshot_dtype=torch.float32, keep_live=True
    )
    lo = hi = flat(model.state_dict())
    live_at, direct_at = {}, {}
    for step in range(1, STEPS + 1):
        walk.step()
        v = flat(model.state_dict())
        lo, hi = torch.minimum(lo, v), torch.maximum(hi, v)
        direct.update()
        for ph in stores.values():
            ph.update()
        if step % 100 == 0:
            live_at[step] = {k: t.clone() for k, t in model.state_dict().items()}
        if step == 1000:
            direct_at[step] = {k: t.clone() for k, t in direct.averaged_tensors("p08").items()}
    for ph in stores.values():
        ph.close()
    return {
        "stores": stores,
        "direct": direct,
        "movement": (hi - lo).max().item(),
        "live_at": live_at,
        "direct_at": direct_at,
        "model": model,
    }


def _error(rec, ref, movement):
    return (flat(rec) - flat(ref)).abs().max().item() / movement


def test_reconstruction_error_falls_as_snapshots_are_added(run):
    """sigma_rel 0.08 from snapshots of 0.05 and 0.10 vs a power(0.08) average kept directly."""
    ref = run["direct"].averaged_tensors("p08")
    errors = {}
    for every in EVERY:
        rec = polyak.posthoc.reconstruct(run["stores"][every].directory, sigma_rel=0.08)
        errors[STEPS // every] = _error(rec, ref, run["movement"])
    print("max |reconstruction - direct| / movement, by snapshots:", errors)
    values = list(errors.values())
    assert all(a > 5 * b for a, b in itertools.pairwise(values)), errors
    assert errors[20] < 3e-5 and errors[40] < 3e-6, errors


def test_constant_decay_target_matches_a_debiased_ema_kept_directly(run):
    rec = polyak.posthoc.reconstruct(run["stores"][50].directory, decay=0.995)
    err = _error(rec, run["direct"].averaged_tensors("d995"), run["movement"])
    assert err < 5e-5 and rec.fit < 1e-3 and rec.label == "decay=0.995"


def test_reconstruct_at_an_earlier_step_uses_only_the_snapshots_before_it(run):
    directory = run["stores"][50].directory
    rec = polyak.posthoc.reconstruct(directory, sigma_rel=0.08, step=1000)
    assert rec.step == 1000 and max(s for s, _ in rec.sources) == 1000
    assert _error(rec, run["direct_at"][1000], run["movement"]) < 2e-5  # 20 snapshots


def test_a_stored_sigma_rel_at_a_snapshot_step_returns_that_snapshot(run):
    store = run["stores"][100]
    listing = polyak.posthoc.list_snapshots(store.directory)
    assert [s["step"] for s in listing.snapshots] == list(range(100, STEPS + 1, 100))
    for step in (700, STEPS):
        rec = polyak.posthoc.reconstruct(store.directory, sigma_rel=0.05, step=step)
        saved = load_file(store.directory / f"{step:010d}-sigma0.05-{store.run_id}.safetensors")
        for name, value in saved.items():
            torch.testing.assert_close(rec[name], value, rtol=0, atol=1e-6, msg=name)
    assert _error(rec, run["direct"].averaged_tensors("p05"), run["movement"]) < 1e-6


def test_float16_snapshots_add_an_error_bounded_by_their_rounding(run):
    """Measured, not assumed: the extra error is ~1e-4 of the weights, below fp16's half ulp."""
    ref = run["direct"].averaged_tensors("p08")
    rec16 = polyak.posthoc.reconstruct(run["stores"]["fp16"].directory, sigma_rel=0.08)
    rec32 = polyak.posthoc.reconstruct(run["stores"][100].directory, sigma_rel=0.08)
    size = flat(ref).abs().max().item()
    extra = (flat(rec16) - flat(rec32)).abs().max().item()
    print(
        f"float16 extra error: {extra / size:.2e} of max |w|, {extra / run['movement']:.2e} "
        f"of the movement; float32 error {_error(rec32, ref, run['movement']):.2e}"
    )
    bound = rec16.solution.amplification * 2.0**-11 * size  # half an ulp of the largest weight
    assert 0 < extra < bound
    assert rec16.fit == rec32.fit and rec16.sources == rec32.sources
    # far narrower than the stored 0.05: large alternating coefficients magnify the rounding
    with pytest.warns(UserWarning, match=r"sigma_rel=0.01: .* magnifies their float16 rounding"):
        narrow = polyak.posthoc.reconstruct(run["stores"]["fp16"].directory, sigma_rel=0.01)
    assert narrow.solution.amplification > 10


def test_a_constant_weight_stream_is_returned_exactly(tmp_path):
    model = small_model()
    ph = polyak.PostHocEMA(model, tmp_path, snapshot_every=10, snapshot_dtype=torch.float32)
    for _ in range(100):
        ph.update()
    ph.close()
    recs = polyak.posthoc.reconstruct_many(tmp_path, [0.02, 0.08, 0.2], decays=[0.99])
    for rec in recs.values():
        for name, value in model.state_dict().items():
            assert torch.equal(rec[name], value), (rec.label, name)
        assert rec.coefficients.sum() == pytest.approx(1.0, abs=1e-12)


def test_reconstruct_many_reads_each_file_once_and_equals_one_at_a_time(run, monkeypatch):
    directory = run["stores"][100].directory
    read = {}
    original = reader.Stream.read_into

    def counting(self, begin, out):
        read[self.file.path] = read.get(self.file.path, 0) + len(out)
        return original(self, begin, out)

    finish = reader.Stream.finish

    def in_order(self):
        assert self.in_order, self.file.path  # checksummed on the way: no second pass
        return finish(self)

    monkeypatch.setattr(reader.Stream, "read_into", counting)
    monkeypatch.setattr(reader.Stream, "finish", in_order)
    many = polyak.posthoc.reconstruct_many(directory, [0.03, 0.08, 0.15], decays=[0.995])
    files = sorted(directory.glob("*.safetensors"))
    assert sorted(read) == files
    for path in files:
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        assert read[path] == path.stat().st_size - header  # every tensor byte, once
    monkeypatch.undo()
    one = polyak.posthoc.reconstruct(directory, sigma_rel=0.15)
    exact = exact_combination(directory, one)
    assert one.sources == many[0.15].sources
    np.testing.assert_array_equal(one.coefficients, many[0.15].coefficients)
    for name in exact:  # to float32 rounding: the sums are taken in another order
        for rec in (one, many[0.15]):
            error = (rec[name].double() - exact[name]).abs().max().item()
            assert error <= fp32_bound(one, exact), (name, error)
    assert (
        [r.label for r in many.values()]
        == list(many)
        == [
            "sigma_rel=0.03",
            "sigma_rel=0.08",
            "sigma_rel=0.15",
            "decay=0.995",
        ]
    )


def test_the_reconstruction_loads_into_the_model(run):
    rec = polyak.posthoc.reconstruct(run["stores"][100].directory, sigma_rel=0.1)
    model = small_model()
    model.load_state_dict(rec)  # every tensor, canonical names, copied buffers included
    assert model[1].num_batches_tracked.item() == STEPS
    assert rec["0.weight"].dtype == torch.float32


def test_window_average_is_the_mean_of_the_last_live_snapshots(run):
    directory = run["stores"]["live"].directory
    lawa = polyak.posthoc.window_average(directory, 3, step=1500)
    for name, value in lawa.items():
        if value.is_floating_point():
            expected = sum(run["live_at"][s][name].double() for s in (1300, 1400, 1500)) / 3
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
    assert lawa.label == "window=3" and [s for s, _ in lawa.sources] == [1300, 1400, 1500]
    with pytest.raises(ValueError, match="keep_live=True"):
        polyak.posthoc.window_average(run["stores"][100].directory, 2)
    # the live file is never used as a power profile
    rec = polyak.posthoc.reconstruct(directory, sigma_rel=0.08)
    assert {k for _, k in rec.sources} == {"sigma0.05", "sigma0.1"}


@pytest.mark.parametrize("kwargs", [{"update_every": 7}, {"start_step": 300}])
def test_update_every_and_start_step_keep_the_profile(tmp_path, kwargs):
    model = small_model()
    walk = Walk(model)
    direct = polyak.EMA(
        model, polyak.schedules.power(sigma_rel=0.08), dtype=torch.float64, **kwargs
    )
    ph = polyak.PostHocEMA(
        model, tmp_path, snapshot_every=50, snapshot_dtype=torch.float32, **kwargs
    )
    lo = hi = flat(model.state_dict())
    for _ in range(1000):
        walk.step()
        v = flat(model.state_dict())
        lo, hi = torch.minimum(lo, v), torch.maximum(hi, v)
        direct.update()
        ph.update()
    ph.close()
    rec = polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.08)
    assert rec.step == 1000
    # the last update before step 1000 was at step 994; steps <= start_step are copies
    assert rec.solution.t == (994 if "update_every" in kwargs else 700)
    assert _error(rec, direct.averaged_tensors(), (hi - lo).max().item()) < 5e-5


def test_chunks_across_tensors_and_several_passes_give_the_same_result(run, monkeypatch):
    """Tiny chunks split and join tensors; 3 files per pass forces the multi-pass path; tiny
    blocks split every chunk. Each result is the float64 combination of its files, to float32
    rounding."""
    directory = run["stores"][100].directory
    expected = polyak.posthoc.reconstruct_many(directory, [0.05, 0.12], decays=[0.995])
    monkeypatch.setattr(polyak.posthoc.combine, "GROUP", 3)
    monkeypatch.setattr(polyak.posthoc.combine, "_BLOCK_BYTES", 4 * 4 * 5)
    got = polyak.posthoc.reconstruct_many(
        directory, [0.05, 0.12], decays=[0.995], chunk_bytes=4 * 3 * 7
    )
    for a, b in zip(expected.values(), got.values()):
        assert list(a) == list(b) and a.sources == b.sources
        exact = exact_combination(directory, a)
        bound = fp32_bound(a, exact)
        for name in exact:
            for rec in (a, b):
                error = (rec[name].double() - exact[name]).abs().max().item()
                assert error <= bound, (rec.label, name, error, bound)


def test_the_guide_example_runs(monkeypatch, tmp_path):
    page = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "posthoc.md").read_text()
    code = re.findall(r"```python\n(.*?)```", page, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/guides/posthoc.md", "exec"), scope)
    assert scope["avg"].fit < 3e-3 and len(scope["sweep"]) == 5


def test_the_guide_accuracy_table_is_the_committed_benchmark_result():
    root = Path(__file__).resolve().parents[1]
    results = sorted((root / "benchmarks" / "results").glob("*_posthoc_*[0-9].json"))
    assert results, "no committed benchmarks/posthoc.py result"
    report = runpy.run_path(str(root / "benchmarks" / "posthoc_report.py"))
    table = report["readme_table"](json.loads(results[-1].read_text()))
    page = (root / "docs" / "guides" / "posthoc.md").read_text()
    block = page.split("<!-- posthoc-table:start -->\n")[1].split("\n<!-- posthoc-table:end")[0]
    assert block.strip() == table.strip()


def test_empty_tensors_and_float64_outputs(tmp_path):
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(3, 4))
    model.empty = torch.nn.Parameter(torch.zeros(0, 4))
    model.register_buffer("count", torch.zeros((), dtype=torch.int64))
    ph = polyak.PostHocEMA(model, tmp_path, snapshot_every=5, snapshot_dtype=torch.float32)
    for _ in range(20):
        with torch.no_grad():
            model.w.add_(0.1)
            model.count += 1
        ph.update()
    ph.close()
    rec = polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1, dtype=torch.float64)
    assert rec["empty"].shape == (0, 4) and rec["count"].item() == 20
    assert rec["w"].dtype == torch.float64
    with pytest.raises(TypeError, match="dtype"):
        polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1, dtype=torch.float16)
