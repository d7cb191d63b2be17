"""States saved without pickle: ``ArrayEMA.save`` / ``load`` through one ``.npz`` file, written
atomically and read back as untrusted input (crafted, edited, damaged or huge-looking files get
a named error, never a traceback, an unpickling, or an allocation beyond the file's size)."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyak
from polyak import ArrayEMA, schedules

PARAMS = {"w": np.zeros((3, 2), np.float32), "b": [np.zeros(4)]}
DECAY = {"fast": 0.5, "slow": schedules.warmup(0.99)}


def trained(nonfinite: str = "propagate", steps: int = 5) -> ArrayEMA:
    rng = np.random.default_rng(0)
    ema = ArrayEMA(PARAMS, DECAY, nonfinite=nonfinite)
    for _ in range(steps):
        ema.update({"w": rng.normal(size=(3, 2)).astype(np.float32), "b": [rng.normal(size=4)]})
    return ema


def fresh(nonfinite: str = "propagate") -> ArrayEMA:
    return ArrayEMA(PARAMS, DECAY, nonfinite=nonfinite)


def same(a: ArrayEMA, b: ArrayEMA) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    arrays = all(
        x.dtype == y.dtype and np.array_equal(x, y)
        for n in a.names
        for x, y in zip(sa["averages"][n], sb["averages"][n])
    ) and all(np.array_equal(x, y) for x, y in zip(sa["initial"], sb["initial"]))
    rest = ("timeline", "leftover", "skipped_updates", "paths")
    return arrays and all(sa[k] == sb[k] for k in rest)


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rewrite(path, files: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compress) as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_save_load_resumes_bit_for_bit_and_np_load_reads_it_without_pickle(tmp_path):
    path = tmp_path / "ema.npz"
    ema = trained("skip")
    ema.update({"w": np.full((3, 2), np.nan, np.float32), "b": [np.ones(4)]})  # skipped
    ema.save(path)
    back = fresh("skip")
    back.load(path)
    assert same(ema, back) and back.skipped_updates == 1
    nxt = {"w": np.ones((3, 2), np.float32), "b": [np.ones(4)]}
    ema.update(nxt)
    back.update(nxt)
    assert same(ema, back)
    with np.load(path, allow_pickle=False) as z:  # plain .npy members: any NumPy reads them
        assert z["arrays/0"].dtype == np.float32
    assert sorted(os.listdir(tmp_path)) == ["ema.npz"]  # no temporary file left


def test_a_failure_while_saving_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ema.npz"
    old = trained(steps=1)
    old.save(path)
    before = path.read_bytes()
    real, calls = np.lib.format.write_array, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing)
    with pytest.raises(OSError, match="No space left"):
        trained(steps=4).save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ema.npz"]


def test_state_dict_and_save_warn_and_load_refuses_a_nonfinite_average(tmp_path):
    ema = fresh()
    ema.update({"w": np.full((3, 2), np.inf, np.float32), "b": [np.ones(4)]})
    with pytest.warns(UserWarning, match=r"state_dict\(\): average '\w+' holds inf/nan at") as r:
        ema.state_dict()
    assert len(r) == 2 and {w.filename for w in r} == {__file__}  # one per average
    with pytest.warns(UserWarning, match=r"save\(\): average '\w+' holds inf/nan at \[\"\['w'\]"):
        ema.save(tmp_path / "bad.npz")
    target = fresh()
    with pytest.raises(polyak.NonFiniteError, match=r"bad.npz: average 'fast' at \['w'\] holds"):
        target.load(tmp_path / "bad.npz")
    assert same(target, fresh())


def test_a_file_for_another_ema_is_a_checkpoint_error_naming_file_and_field(tmp_path):
    path = tmp_path / "ema.npz"
    trained().save(path)
    others = [
        (ArrayEMA(PARAMS, {"fast": 0.5}), r"the saved averages"),
        (ArrayEMA({"w": np.zeros((3, 3), np.float32), "b": [np.zeros(4)]}, DECAY), r"shape"),
        (ArrayEMA(PARAMS, DECAY, init="zero"), r"init='copy'"),
    ]
    for other, match in others:
        with pytest.raises(polyak.CheckpointError, match=rf"ema.npz: .*{match}"):
            other.load(path)


def _edited(path, edit):
    files = members(path)
    state = json.loads(files["state.json"])
    edit(state, files)
    files["state.json"] = json.dumps(state).encode()
    rewrite(path, files)


EDITS = [
    (lambda s, f: s.pop("timeline"), "no 'timeline' field"),
    (lambda s, f: s.__setitem__("format", "polyak.EMA"), "not a polyak.ArrayEMA v1"),
    (lambda s, f: s["timeline"].__setitem__("step", -3), "step must be >= 0"),
    (lambda s, f: s.__setitem__("skipped_updates", 99), "skipped_updates must be an integer"),
    (lambda s, f: s["leftover"].__setitem__("slow", "x"), "leftover weight of 'slow'"),
    (lambda s, f: s["averages"].__setitem__("fast", {"__array__": 99}), "missing or reused"),
    (lambda s, f: s["averages"].__setitem__("fast", [{"__array__": 0}] * 2), "missing or reused"),
    (lambda s, f: s["averages"].__setitem__("fast", [{"__array__": "0"}]), "malformed array ref"),
    (
        lambda s, f: (
            s["averages"].__setitem__("fast", 7),
            f.pop("arrays/0.npy"),
            f.pop("arrays/1.npy"),
        ),
        "average 'fast' must be a list of arrays",
    ),
    (lambda s, f: f.__setitem__("arrays/0.npy", npy(np.zeros((3, 3)))), r"shape \(3, 3\)"),
    (lambda s, f: f.__setitem__("arrays/0.npy", npy(np.zeros(6, "U1"))), "not a plain numeric"),
    (
        lambda s, f: f.__setitem__("arrays/0.npy", b"\x93NUMPY garbage"),
        "damaged|not a .npy|version",
    ),
    (lambda s, f: f.__setitem__("arrays/99.npy", npy(np.zeros(1))), r"\['arrays/99.npy'\] are not"),
    (lambda s, f: f.__setitem__("../escape.npy", b""), "not a member of a polyak state"),
]


@pytest.mark.parametrize(("edit", "match"), EDITS)
def test_an_edited_file_is_a_named_error_and_changes_nothing(tmp_path, edit, match):
    path = tmp_path / "ema.npz"
    trained().save(path)
    _edited(path, edit)
    target = trained(steps=2)
    before = target.state_dict()
    with pytest.raises(polyak.CheckpointError, match=match):
        target.load(path)
    after = target.state_dict()
    assert after["timeline"] == before["timeline"]
    assert all(
        np.array_equal(x, y)
        for n in target.names
        for x, y in zip(after["averages"][n], before["averages"][n])
    )


def test_a_header_claiming_a_huge_array_is_refused_before_any_allocation(tmp_path):
    path = tmp_path / "ema.npz"
    trained().save(path)
    files = members(path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    files["arrays/0.npy"] = header.getvalue() + b"\0" * 24  # 24 bytes of data, not 4 TB
    rewrite(path, files)
    with pytest.raises(polyak.CheckpointError, match=r"says \(1000000000000,\) float32"):
        fresh().load(path)


def test_what_is_not_a_state_file_is_a_named_error(tmp_path):
    path = tmp_path / "ema.npz"
    trained().save(path)
    files = members(path)
    cases = {
        "random.npz": lambda p: p.write_bytes(os.urandom(300)),
        "empty.npz": lambda p: p.write_bytes(b""),
        "truncated.npz": lambda p: p.write_bytes(path.read_bytes()[:-40]),
        "compressed.npz": lambda p: rewrite(p, files, zipfile.ZIP_DEFLATED),
        "nojson.npz": lambda p: rewrite(p, {k: v for k, v in files.items() if k != "state.json"}),
        "badjson.npz": lambda p: rewrite(p, {**files, "state.json": b"{"}),
        "deep.npz": lambda p: rewrite(p, {**files, "state.json": b"[" * 100_000}),
        "pickle.npz": lambda p: np.savez(p, x=np.array([object()], dtype=object)),
    }
    for name, make in cases.items():
        make(tmp_path / name)
        with pytest.raises(polyak.CheckpointError, match=name.replace(".", r"\.")):
            fresh().load(tmp_path / name)
    os.mkfifo(tmp_path / "fifo.npz")  # a reader would block on it forever
    with pytest.raises(polyak.CheckpointError, match="not a regular file"):
        fresh().load(tmp_path / "fifo.npz")
    with pytest.raises(polyak.CheckpointError, match="not a regular file"):
        fresh().load(tmp_path)
    with pytest.raises(FileNotFoundError):
        fresh().load(tmp_path / "missing.npz")


def test_save_refuses_what_json_cannot_hold_naming_the_place(tmp_path):
    from polyak._npz import save_npz

    with pytest.raises(TypeError, match=r"state\['x'\]\[1\]: a set cannot be saved"):
        save_npz(tmp_path / "s.npz", {"x": [1, {2}]})
    with pytest.raises(TypeError, match=r"state\['x'\]: an array of dtype object"):
        save_npz(tmp_path / "s.npz", {"x": np.array([None])})
    with pytest.raises(TypeError, match="keys must be strings other than '__array__'"):
        save_npz(tmp_path / "s.npz", {"x": {"__array__": 0}})
    assert os.listdir(tmp_path) == []


_SAVED: dict[str, bytes] = {}


def _saved_bytes(tmp_path_factory) -> bytes:
    if not _SAVED:
        path = tmp_path_factory.mktemp("saved") / "ema.npz"
        trained().save(path)
        _SAVED["b"] = path.read_bytes()
    return _SAVED["b"]


def _fuzz(tmp_path_factory, flips) -> None:
    data = bytearray(_saved_bytes(tmp_path_factory))
    for pos, value in flips:
        data[pos % len(data)] = value
    path = tmp_path_factory.mktemp("fuzz") / "ema.npz"
    path.write_bytes(bytes(data))
    target = fresh()
    try:
        target.load(path)
    except (polyak.CheckpointError, polyak.NonFiniteError):
        assert same(target, fresh())  # nothing changed
        return
    assert same(target, trained())  # a flip in bytes nothing reads (a timestamp): same state


_FLIPS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(flips=_FLIPS)
def test_damaged_bytes_give_a_named_error_or_the_saved_state(tmp_path_factory, flips):
    _fuzz(tmp_path_factory, flips)


@pytest.mark.slow
@settings(
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(flips=_FLIPS)
def test_damaged_bytes_deep(tmp_path_factory, flips):
    _fuzz(tmp_path_factory, flips)


def test_the_zip_directory_fields_are_checked(tmp_path):
    """A central directory entry announcing a compressed (deflate) member whose local header
    says stored: refused from the directory, before any member is opened."""
    path = tmp_path / "ema.npz"
    trained().save(path)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # first central directory entry: compression at +10
    struct.pack_into("<H", data, central + 10, zipfile.ZIP_DEFLATED)
    path.write_bytes(bytes(data))
    with pytest.raises(polyak.CheckpointError, match="compressed, encrypted, flagged or repeated"):
        fresh().load(path)
