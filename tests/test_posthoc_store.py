"""The snapshot store: atomic writes, one run per store, checksums, retention, resume."""

from __future__ import annotations

import json
import os
import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyak
from polyak.posthoc import checksum, store, writer
from posthoc_helpers import set_weights, small_model


def _train(ph, model, steps, start=1):
    for step in range(start, start + steps):
        set_weights(model, step)
        ph.update()


def _new(directory, every=10, **kwargs):
    model = small_model()
    kwargs.setdefault("snapshot_dtype", torch.float32)
    return model, polyak.PostHocEMA(model, directory, snapshot_every=every, **kwargs)


def _manifest(directory):
    return (directory / "manifest.json").read_bytes()


def _same(a, b):
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _calls(targets, monkeypatch, action):
    """Wrap each ``(owner, attr)``; count calls; ``action(key, n)`` may raise."""
    counts = {}
    for owner, attr in targets:
        original = getattr(owner, attr)
        key = (owner.__name__.rsplit(".")[-1], attr)

        def wrapped(*a, _key=key, _f=original, **k):
            counts[_key] = counts.get(_key, 0) + 1
            action(_key, counts[_key])
            return _f(*a, **k)

        monkeypatch.setattr(owner, attr, wrapped)
    return counts


STAGES = [
    (writer, "_save"),
    (os, "fsync"),
    (checksum, "file_checksum"),
    (os, "replace"),
    (json, "dump"),
    (writer, "_remove"),
]


def test_a_failure_at_any_stage_of_a_write_leaves_a_readable_store(tmp_path, monkeypatch):
    """Inject an error at every call a snapshot write makes, one at a time."""
    model, ph = _new(tmp_path)
    _train(ph, model, 30)
    ph.wait()
    with monkeypatch.context() as m:  # count the calls of one normal write (step 40)
        calls = _calls(STAGES, m, lambda key, n: None)
        _train(ph, model, 10, start=31)
        ph.wait()
    assert calls[("writer", "_save")] == 2 and calls[("os", "replace")] >= 3
    step = 40
    for (owner, attr), n_calls in calls.items():
        for k in range(1, n_calls + 1):  # owner, attr: names of the function that fails
            before = _manifest(tmp_path)
            listed = [s["step"] for s in json.loads(before)["snapshots"]]
            expected = polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.08)

            def fail(key, n, _at=((owner, attr), k)):
                if (key, n) == _at:
                    raise RuntimeError("injected")

            with monkeypatch.context() as m:
                _calls(STAGES, m, fail)
                _train(ph, model, 10, start=step + 1)
                with pytest.raises(polyak.posthoc.SnapshotWriteError, match="injected"):
                    ph.wait()
            step += 10
            after = json.loads(_manifest(tmp_path))
            steps = [s["step"] for s in after["snapshots"]]
            listing = polyak.posthoc.list_snapshots(tmp_path, verify=True)
            assert not any(s["problems"] for s in listing.snapshots), (attr, k, listing.snapshots)
            assert listing.ignored == [], (attr, k, listing.ignored)  # no leftover files
            if steps == listed:  # the manifest was not replaced: bit for bit as before
                assert _manifest(tmp_path) == before, (attr, k)
                _same(polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.08), expected)
            else:  # it failed after the new manifest was in place: the snapshot is complete
                assert steps == [*listed, step] and (attr, k) in {("_remove", 1), ("fsync", 6)}
    _train(ph, model, 10, start=step + 1)  # and the store takes new snapshots again
    ph.close()
    assert polyak.posthoc.list_snapshots(tmp_path).snapshots[-1]["step"] == step + 10


def test_the_training_thread_does_not_wait_for_the_file_write(tmp_path, monkeypatch):
    model, ph = _new(tmp_path)
    release, started = threading.Event(), threading.Event()
    original = writer._save

    def slow_save(*args):
        started.set()
        assert release.wait(10)
        return original(*args)

    monkeypatch.setattr(writer, "_save", slow_save)
    _train(ph, model, 10)  # step 10: snapshot; returns while the write is blocked
    assert started.wait(10) and not (tmp_path / "manifest.json").exists()
    release.set()
    ph.wait()
    assert [s["step"] for s in polyak.posthoc.list_snapshots(tmp_path).snapshots] == [10]


def test_a_new_run_never_writes_into_another_runs_store(tmp_path):
    model, ph = _new(tmp_path)
    _train(ph, model, 10)
    ph.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    model2, other = _new(tmp_path)
    _train(other, model2, 9)  # nothing written yet: the check comes with the first snapshot
    with pytest.raises(polyak.posthoc.ForeignRunError, match=ph.run_id):
        _train(other, model2, 1, start=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    _, fresh = _new(tmp_path / "new" / "dir")  # a missing directory is created
    fresh.snapshot()
    fresh.close()
    assert (tmp_path / "new" / "dir" / "manifest.json").exists()


def test_files_no_manifest_lists_are_ignored_with_a_warning(tmp_path):
    model, ph = _new(tmp_path)
    _train(ph, model, 20)
    ph.close()
    expected = polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1)
    stale = {n: t * 100 for n, t in expected.items()}  # another run's snapshot, ema-pytorch's .pt
    save_file(stale, str(tmp_path / f"0000000020-sigma0.1-{'f' * 16}.safetensors"))
    torch.save(stale, tmp_path / "0.20.pt")
    with pytest.warns(UserWarning, match=r"ignoring 2 file\(s\)") as caught:
        got = polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1)
    assert "0.20.pt" in str(caught[0].message)
    _same(got, expected)
    assert len(polyak.posthoc.list_snapshots(tmp_path).ignored) == 2


def test_a_resumed_run_removes_its_own_crash_leftovers(tmp_path):
    model, ph = _new(tmp_path)
    _train(ph, model, 20)
    ph.close()
    state = ph.state_dict()
    mine = store.file_name(30, "sigma0.05", ph.run_id, None)
    (tmp_path / mine).write_bytes(b"published, never listed")
    (tmp_path / f".{mine}.1234abcd.tmp").write_bytes(b"half written")
    model2, resumed = _new(tmp_path)
    resumed.load_state_dict(state)
    _train(resumed, model2, 10, start=21)
    resumed.close()
    listing = polyak.posthoc.list_snapshots(tmp_path, verify=True)
    assert listing.ignored == [] and [s["step"] for s in listing.snapshots] == [10, 20, 30]


def test_a_corrupt_file_is_refused_naming_the_file_and_its_step(tmp_path):
    model, ph = _new(tmp_path)
    _train(ph, model, 30)
    ph.close()
    good = polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1, step=10)
    path = tmp_path / store.file_name(20, "sigma0.1", ph.run_id, None)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(polyak.posthoc.ChecksumError, match=rf"{path.name} \(step 20\).*CRC-32"):
        polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1)
    _same(polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1, step=10), good)  # does not use it
    listing = polyak.posthoc.list_snapshots(tmp_path, verify=True)
    assert [bool(s["problems"]) for s in listing.snapshots] == [False, True, False]
    path.write_bytes(bytes(data[:-100]))  # found from its size, before any file is read
    with pytest.raises(polyak.posthoc.ChecksumError, match=r"step 20\).*bytes, the manifest says"):
        polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1)
    path.unlink()
    with pytest.raises(polyak.posthoc.ChecksumError, match=r"step 20\).*missing"):
        polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1)


def test_retention_keeps_every_nth_old_snapshot(tmp_path):
    model, ph = _new(tmp_path, retention=polyak.posthoc.Retention(every=2, older_than=30))
    _train(ph, model, 100)
    ph.close()
    steps = [s["step"] for s in polyak.posthoc.list_snapshots(tmp_path).snapshots]
    assert steps == [20, 40, 60, 70, 80, 90, 100]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 * len(steps)


def test_resume_appends_the_same_store_and_reconstruction_as_one_run(tmp_path):
    """N steps, save, load into fresh objects, M steps == N + M steps."""
    model, whole = _new(tmp_path / "whole", keep_live=True)
    _train(whole, model, 95)
    whole.close()
    model1, first = _new(tmp_path / "resumed", keep_live=True)
    _train(first, model1, 47)
    saved = tmp_path / "state.pt"
    torch.save(first.state_dict(), saved)
    _train(first, model1, 8, start=48)  # snapshot 50 is written, then the run "crashes"
    first.close()
    model2, second = _new(tmp_path / "resumed", keep_live=True)
    second.load_state_dict(torch.load(saved, weights_only=True))
    with pytest.warns(UserWarning, match=r"replacing the snapshots at steps \[50\]"):
        _train(second, model2, 48, start=48)
    second.close()
    a = json.loads(_manifest(tmp_path / "whole"))
    b = json.loads(_manifest(tmp_path / "resumed"))
    assert b["run_id"] == first.run_id != a["run_id"]
    assert [(s["step"], s["t"]) for s in a["snapshots"]] == [
        (s["step"], s["t"]) for s in b["snapshots"]
    ]
    for sa, sb in zip(a["snapshots"], b["snapshots"]):
        for key in sa["files"]:
            _same(
                load_file(tmp_path / "whole" / sa["files"][key]["name"]),
                load_file(tmp_path / "resumed" / sb["files"][key]["name"]),
            )
    for x, y in zip(
        polyak.posthoc.reconstruct_many(tmp_path / "whole", [0.03, 0.2], decays=[0.9]).values(),
        polyak.posthoc.reconstruct_many(tmp_path / "resumed", [0.03, 0.2], decays=[0.9]).values(),
    ):
        _same(x, y)
    _same(
        polyak.posthoc.window_average(tmp_path / "whole", 4),
        polyak.posthoc.window_average(tmp_path / "resumed", 4),
    )


def test_keep_live_reads_the_model_at_the_snapshot_and_keeps_no_copy(tmp_path):
    """The live file holds the model's weights of the snapshot's step, even between updates
    (update_every=3, snapshot at step 10); the EMA holds the power averages only."""
    model, ph = _new(tmp_path / "live", keep_live=True, update_every=3)
    plain = polyak.PostHocEMA(small_model(), tmp_path / "plain", update_every=3)
    assert ph.ema.names == plain.ema.names and ph.ema.nbytes == plain.ema.nbytes
    _train(ph, model, 10)
    ph.close()
    (snap,) = json.loads(_manifest(tmp_path / "live"))["snapshots"]
    assert (snap["step"], snap["t"]) == (10, 9)  # the averages' last update was at step 9
    live = load_file(tmp_path / "live" / snap["files"]["live"]["name"])
    assert live.keys() == model.state_dict().keys()  # copied buffers of step 10 too
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())  # float32


def test_load_state_dict_checks_everything_first(tmp_path):
    model, ph = _new(tmp_path)
    _train(ph, model, 5)
    state = ph.state_dict()
    _, other = _new(tmp_path, sigma_rels=(0.05, 0.2))
    before = {k: v.clone() for k, v in other.ema.averaged_tensors(other.ema.names[0]).items()}
    with pytest.raises(ValueError, match=r"sigma_rels=\[0.05, 0.1\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="snapshot_dtype"):
        _new(tmp_path, snapshot_dtype=torch.float16)[1].load_state_dict(state)
    with pytest.raises(ValueError, match="polyak.PostHocEMA"):
        ph.load_state_dict(state["ema"])
    _same(other.ema.averaged_tensors(other.ema.names[0]), before)
    assert other.run_id != ph.run_id and other.ema.step == 0


def test_a_store_keeps_the_settings_it_was_written_with(tmp_path):
    model, ph = _new(tmp_path)
    _train(ph, model, 10)
    ph.close()
    model2, changed = _new(tmp_path, exclude="3.*")
    changed.load_state_dict({**ph.state_dict(), "ema": changed.ema.state_dict()})
    with pytest.raises(polyak.posthoc.StoreError, match="tensors"):
        _train(changed, model2, 20, start=11)


def test_a_snapshot_that_does_not_fit_float16_is_refused_by_name(tmp_path):
    model, ph = _new(tmp_path, snapshot_dtype=torch.float16)
    with torch.no_grad():
        model[0].weight[0, 0] = 1e5
    ph.update()  # the first update copies the weights
    ph.snapshot()
    with pytest.raises(polyak.posthoc.SnapshotWriteError, match=r"0\.weight.*65504") as caught:
        ph.wait()
    assert isinstance(caught.value.__cause__, polyak.NonFiniteError)
    assert caught.value.__cause__.names == ["0.weight"]
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.iterdir())


def test_bad_arguments_are_named(tmp_path):
    model = small_model()
    with pytest.raises(TypeError, match="decay"):
        polyak.PostHocEMA(model, tmp_path, decay=0.9)
    with pytest.raises(ValueError, match="sigma_rel"):
        polyak.PostHocEMA(model, tmp_path, sigma_rels=(0.05, 0.3))
    with pytest.raises(ValueError, match="distinct"):
        polyak.PostHocEMA(model, tmp_path, sigma_rels=(0.1, 0.1))
    with pytest.raises(TypeError, match="snapshot_dtype"):
        polyak.PostHocEMA(model, tmp_path, snapshot_dtype=torch.int8)
    with pytest.raises(ValueError, match="snapshot_every"):
        polyak.PostHocEMA(model, tmp_path, snapshot_every=0)
    with pytest.raises(ValueError, match="every"):
        polyak.posthoc.Retention(every=0, older_than=10)
    with pytest.raises(polyak.posthoc.StoreError, match="no manifest"):
        polyak.posthoc.reconstruct(tmp_path, sigma_rel=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        polyak.PostHocEMA(model, tmp_path, sigma_rels=(0.05,))  # one average is allowed


def test_a_failed_write_is_raised_by_the_next_snapshot_which_is_still_taken(tmp_path, monkeypatch):
    model, ph = _new(tmp_path)
    original, calls = writer._save, []

    def fail_first(*args):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")
        return original(*args)

    monkeypatch.setattr(writer, "_save", fail_first)
    _train(ph, model, 10)  # the write of step 10 fails in the background
    with pytest.raises(polyak.posthoc.SnapshotWriteError, match=r"step 10 .*disk full"):
        _train(ph, model, 10, start=11)  # raised by the snapshot of step 20...
    ph.close()
    steps = [s["step"] for s in polyak.posthoc.list_snapshots(tmp_path).snapshots]
    assert steps == [20]  # ...which was taken all the same
