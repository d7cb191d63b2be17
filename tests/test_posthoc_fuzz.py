"""Fuzzing the snapshot store: crafted manifests, file names, snapshot bytes and files.

A small valid store (unsharded, and the same split over two ranks) is built once; each case
copies it, applies a few mutations drawn by hypothesis (a manifest field replaced, deleted or
added anywhere in the tree; a file name replaced by a crafted one; bytes of a snapshot file
changed, with or without the manifest's size and checksum updated to match; a file replaced by
a symlink leaving the store, a symlink to /dev/zero, a fifo, a directory, or deleted) and runs
the readers (``reconstruct``, ``list_snapshots(verify=True)``, ``weight_profiles``) or the
writer's resume and retention paths on it. The property: each either raises a named polyak
error (a ``CheckpointError``, or a ``SnapshotWriteError`` caused by one) or returns the correct
result (the float64 combination of the files as they are on disk, every listed file a regular
file inside the store), and nothing outside the store is touched: a sentinel file beside the
store and a sentinel directory the crafted names point at keep their contents, and the writer
deletes only its own run's files.

The default run keeps the cases few (``FAST``); ``pytest -m slow`` runs ``DEEP``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyak
from posthoc_helpers import (
    crc_entry,
    exact_combination,
    fp32_bound,
    set_weights,
    shard_store,
    small_model,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="symlinks, fifos, /dev/zero")

FAST = {"readers": 120, "writer": 40}  # cases in the default run
DEEP = {"readers": 3000, "writer": 600}  # cases with -m slow
_TIMEOUT = 10  # seconds per case: a hang is a failure, not a stuck test run
_ALLOWED_VALUE_ERRORS = ("no snapshot at or before", "is after the last snapshot")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The valid stores every case starts from, and the state the run saved at step 15."""
    root = tmp_path_factory.mktemp("fuzz-base")
    model = small_model()
    ph = polyak.PostHocEMA(
        model, root / "plain", snapshot_every=10, snapshot_dtype=torch.float32, keep_live=True
    )
    state = None
    for step in range(1, 31):
        set_weights(model, step)
        ph.update()
        if step == 15:
            state = copy.deepcopy(ph.state_dict())
    ph.close()
    shard_store(root / "plain", root / "sharded")
    return root, state


class _Case:
    """One fuzz case's folder: ``store/``, ``sentinel.safetensors`` beside it, and
    ``sentinel_dir/`` holding a valid copy of a snapshot file (so a reader that followed a name
    out of the store would read a file that passes every check), a symlink to /dev/zero and a
    fifo. Every crafted name points into this folder, never at a file of the machine: run
    against a version that deletes what a manifest names, the fuzzer harms nothing else."""

    def __init__(self, base: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="polyak-fuzz-"))
        self.store = self.root / "store"
        shutil.copytree(base, self.store, symlinks=True)
        self.sentinel = self.root / "sentinel.safetensors"
        self.sentinel.write_bytes(b"keep me")
        self.victims = self.root / "sentinel_dir"
        self.victims.mkdir()
        self.victim = self.victims / sorted(p.name for p in self.store.glob("*.safetensors"))[0]
        shutil.copy(self.store / self.victim.name, self.victim)
        (self.victims / "zero").symlink_to("/dev/zero")
        os.mkfifo(self.victims / "fifo")
        self.outside = self._outside()

    def _outside(self) -> dict[str, object]:
        """What is outside the store, without reading a fifo or /dev/zero."""
        out: dict[str, object] = {"root": sorted(p.name for p in self.root.iterdir())}
        for p in [self.sentinel, *sorted(self.victims.iterdir())]:
            if p.is_symlink():
                out[str(p)] = os.readlink(p)
            elif p.is_fifo():
                out[str(p)] = "fifo"
            else:
                out[str(p)] = p.read_bytes()
        return out

    def manifests(self) -> list[Path]:
        return sorted(self.store.glob("manifest*.json"))

    def crafted_names(self) -> list[str]:
        own = sorted(p.name for p in self.store.glob("*.safetensors"))
        return [
            f"../sentinel_dir/{self.victim.name}",
            str(self.victim),
            "../sentinel.safetensors",
            str(self.sentinel),
            "../sentinel_dir/zero",
            str(self.victims / "zero"),
            "../sentinel_dir/fifo",
            str(self.victims / "fifo"),
            "../sentinel_dir",
            "..",
            ".",
            "",
            "a/b.safetensors",
            "x\0y.safetensors",
            "manifest.json",
            own[0],
            own[-1],
            own[0].replace(own[0][:10], "9" * 10),
            own[0][:-28] + "0123456789abcdef.safetensors",
        ]

    def untouched(self) -> None:
        assert self._outside() == self.outside, "something outside the store changed"

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _harmless(text: str) -> bool:
    """Random text used as a name stays inside the case's folder (see :class:`_Case`)."""
    return not text.startswith(("/", "~")) and ".." not in text


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, -1, 10**9, 10**18, 2**62 + 1, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12).filter(_harmless),
    st.lists(st.integers(-3, 10**9), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2),
)


def _mutate_field(data, tree: object, case: _Case) -> None:
    """Walk into the manifest and replace, delete or add a field."""
    parent: object = None
    key: object = None
    node = tree
    while isinstance(node, (dict, list)) and node and data.draw(st.integers(0, 4), "descend"):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys), "key")
        node = node[key]  # type: ignore[index]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), "action")
    if parent is None or (action == "add" and isinstance(node, dict)):
        target = node if isinstance(node, dict) else tree
        if isinstance(target, dict):
            target[data.draw(st.text(max_size=8), "new key")] = data.draw(_VALUES, "value")
        return
    if action == "delete" and isinstance(parent, dict):
        del parent[key]
        return
    value = data.draw(st.one_of(_VALUES, st.sampled_from(case.crafted_names())), "value")
    parent[key] = value  # type: ignore[index]


def _mutate_name(data, tree: dict, case: _Case) -> None:
    snaps = tree.get("snapshots")
    if isinstance(snaps, list) and snaps and isinstance(snaps[0], dict):
        snap = data.draw(st.sampled_from(snaps), "snapshot")
        files = snap.get("files") if isinstance(snap, dict) else None
        if isinstance(files, dict) and files:
            entry = files[data.draw(st.sampled_from(sorted(files)), "file")]
            if isinstance(entry, dict):
                entry["name"] = data.draw(st.sampled_from(case.crafted_names()), "name")


def _regular(case: _Case) -> list[Path]:
    """The store's snapshot files not yet replaced by a mutation (what the mutators change:
    never through a symlink, so the test itself writes nothing outside the store)."""
    return sorted(p for p in case.store.glob("*.safetensors") if p.is_file() and not p.is_symlink())


def _mutate_bytes(data, case: _Case) -> None:
    files = _regular(case)
    if not files:
        return
    path = data.draw(st.sampled_from(files), "file")
    raw = bytearray(path.read_bytes())
    if not raw:  # truncated to nothing by an earlier mutation
        return
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "header"]), "how")
    if how == "flip":
        at = data.draw(st.integers(0, len(raw) - 1), "at")
        raw[at] ^= data.draw(st.integers(1, 255), "bits")
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), "length")]
    elif how == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=16), "tail")
    else:  # the header length, or a byte inside the JSON header
        at = data.draw(st.integers(0, min(len(raw) - 1, 8 + int.from_bytes(raw[:8], "little"))))
        raw[at] = data.draw(st.integers(0, 255), "byte")
    path.write_bytes(bytes(raw))
    if data.draw(st.booleans(), "refresh the manifest"):  # an adversary who edits both
        for manifest in case.manifests():
            m = json.loads(manifest.read_text())
            for entry in _entries(m):  # the manifest may be crafted already: what is there
                if entry.get("name") == path.name:
                    entry.update(crc_entry(path, "crc32c" if "crc32c" in entry else "crc32"))
            manifest.write_text(json.dumps(m))


def _entries(m: object) -> list[dict]:
    snaps = m.get("snapshots") if isinstance(m, dict) else None
    out = []
    for snap in snaps if isinstance(snaps, list) else []:
        files = snap.get("files") if isinstance(snap, dict) else None
        out += [
            e for e in (files.values() if isinstance(files, dict) else []) if isinstance(e, dict)
        ]
    return out


def _mutate_file(data, case: _Case) -> None:
    files = _regular(case)
    if len(files) < 2:
        return
    path = data.draw(st.sampled_from(files), "file")
    how = data.draw(
        st.sampled_from(["symlink out", "symlink dev", "fifo", "directory", "delete", "inside"]),
        "how",
    )
    if how == "inside":  # a symlink to another file of the store: allowed, checked as it is
        other = data.draw(st.sampled_from([f for f in files if f != path]), "other")
        path.unlink()
        path.symlink_to(other.name)
        return
    path.unlink()
    if how == "symlink out":
        path.symlink_to(case.victim)
    elif how == "symlink dev":
        path.symlink_to("/dev/zero")
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "directory":
        path.mkdir()


def _mutate(data, case: _Case) -> None:
    for _ in range(data.draw(st.integers(1, 3), "mutations")):
        kind = data.draw(st.sampled_from(["field", "field", "name", "bytes", "file"]), "kind")
        if kind in ("bytes", "file"):
            (_mutate_bytes if kind == "bytes" else _mutate_file)(data, case)
            continue
        manifest = data.draw(st.sampled_from(case.manifests()), "manifest")
        tree = json.loads(manifest.read_text())
        (_mutate_field if kind == "field" else _mutate_name)(data, tree, case)
        manifest.write_text(json.dumps(tree))


def _named(e: BaseException) -> bool:
    """A named polyak error: what the property allows instead of a result."""
    if isinstance(e, polyak.CheckpointError):
        return True
    if isinstance(e, polyak.posthoc.SnapshotWriteError):
        return isinstance(e.__cause__, polyak.CheckpointError)
    return type(e) is ValueError and any(m in str(e) for m in _ALLOWED_VALUE_ERRORS)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"a case ran for more than {_TIMEOUT} s")


def _sound(case: _Case, entry: dict) -> bool:
    """A file entry whose name is a regular file inside the store, of the recorded size and
    checksum (computed here independently, with zlib or crc32c)."""
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
        return False
    path = case.store / name
    try:
        if not path.is_file() or path.resolve().parent != case.store.resolve():
            return False
    except (OSError, RuntimeError):
        return False
    algorithm = "crc32c" if "crc32c" in entry else "crc32"
    return crc_entry(path, algorithm) == {k: entry.get(k) for k in ("bytes", algorithm)}


def _manifests(case: _Case) -> dict[str, dict]:
    return {m.name: json.loads(m.read_text()) for m in case.manifests()}


def _check_reconstruction(rec, case: _Case) -> None:
    """A result that was returned is the float64 combination of the files on disk, each of
    them sound."""
    manifests = _manifests(case)
    first = manifests[sorted(manifests)[0]]
    assert list(rec) == list(first["tensors"])
    for name, manifest in manifests.items():
        for snap in manifest["snapshots"]:
            for key, entry in snap["files"].items():
                if (snap["step"], key) in rec.sources:
                    assert _sound(case, entry), entry
        exact = exact_combination(case.store, rec, name)
        bound = fp32_bound(rec, exact) if exact else 0.0
        for tensor, value in exact.items():
            shard = manifest["tensors"][tensor].get("shard")
            got = rec[tensor]
            if shard is not None:
                for dim, (lo, size) in enumerate(zip(shard["offset"], shard["local_shape"])):
                    got = got.narrow(dim, lo, size)
            assert got.shape == value.shape, tensor
            assert (got.double() - value).abs().max() <= bound, tensor


def _check_listing(listing, case: _Case) -> None:
    """A snapshot verified without a problem has only sound files."""
    for m in _manifests(case).values():
        for snap in m["snapshots"]:
            row = next(r for r in listing.snapshots if r["step"] == snap["step"])
            if not row["problems"]:
                assert all(_sound(case, e) for e in snap["files"].values()), snap


def _run_case(base: Path, data, operation) -> None:
    case = _Case(base)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(_TIMEOUT)
    try:
        _mutate(data, case)
        operation(case)
        case.untouched()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        case.close()


def _readers(case: _Case) -> None:
    for read in ("reconstruct", "list", "profiles"):
        try:
            if read == "reconstruct":
                rec = polyak.posthoc.reconstruct(case.store, sigma_rel=0.08)
                _check_reconstruction(rec, case)
            elif read == "list":
                _check_listing(polyak.posthoc.list_snapshots(case.store, verify=True), case)
            else:
                polyak.posthoc.weight_profiles(case.store, [0.08], bins=8)
        except AssertionError:
            raise
        except Exception as e:
            assert _named(e), f"{read}: {type(e).__name__}: {e}"


def _writer(state):
    def resume(case: _Case) -> None:
        before = {p.name for p in case.store.iterdir()}
        run_ids = {state["run_id"]}
        model = small_model()
        ph = polyak.PostHocEMA(
            model,
            case.store,
            snapshot_every=10,
            snapshot_dtype=torch.float32,
            keep_live=True,
            retention=polyak.posthoc.Retention(every=2, older_than=10),
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # replacing snapshots 20, 30
                ph.load_state_dict(state)
                for step in range(16, 41):
                    set_weights(model, step)
                    ph.update()
                ph.close()
        except Exception as e:
            assert _named(e), f"writer: {type(e).__name__}: {e}"
        removed = before - {p.name for p in case.store.iterdir()}
        for name in removed:  # only the run's own files were deleted
            assert any(r in name for r in run_ids) and name.endswith(".safetensors"), name

    return resume


def _fuzz(kind: str, cases: int):
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=st.data(), sharded=st.booleans())
    def test(bases, data, sharded) -> None:
        root, state = bases
        if kind == "readers":
            _run_case(root / ("sharded" if sharded else "plain"), data, _readers)
        else:
            _run_case(root / "plain", data, _writer(state))

    return test


test_fuzz_readers = _fuzz("readers", FAST["readers"])
test_fuzz_writer_resume_and_retention = _fuzz("writer", FAST["writer"])
test_fuzz_readers_deep = pytest.mark.slow(_fuzz("readers", DEEP["readers"]))
test_fuzz_writer_resume_and_retention_deep = pytest.mark.slow(_fuzz("writer", DEEP["writer"]))
