"""Fuzzing what the callbacks read back: the Hugging Face callback's EMA files and the
Lightning callback's checkpoint entry.

A valid ``checkpoint-3`` folder is built once; each case copies it into a fresh directory
beside a sentinel file, mutates it (JSON fields, file names, tensor bytes, tensor contents,
special files), and resumes from it the way the callback does (:func:`read_own_files`, then
:func:`load_checked` into a fresh ``EMA``). The property: either one
:class:`polyak.CheckpointError` and the EMA bit for bit as it was, or a correct result (the
same state a naive reader of the same files loads); and in both cases nothing in or beside the
folder changed (every file, link and special file compared before and after).

Tiers: the fast run tries ``FAST`` cases per property (316 in all: the special files have 16
combinations; a few seconds); ``-m slow`` / ``--all`` tries ``DEEP`` cases each (5016).
``--hypothesis-show-statistics`` shows how many cases were refused and how many loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

import polyak
from polyak.errors import CheckpointError
from polyak.integrations._checkpoint_entry import check_entry, make_entry
from polyak.integrations._common import load_checked
from polyak.integrations._ema_files import JSON_NAME, save_ema_files
from polyak.integrations._identity import read_own_files

FAST, DEEP = 60, 1000  # cases per property and tier (5 properties over files, 1 over entries)
RUN, STEP = uuid.uuid4().hex, 3
DECAY = {"slow": 0.9, "fast": polyak.schedules.warmup(0.5)}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _trained_ema() -> polyak.EMA:
    model = _model()
    ema = polyak.EMA(model, DECAY)
    for _ in range(STEP):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
        model(torch.randn(4, 3))  # BatchNorm statistics and num_batches_tracked move
        ema.update()
    return ema


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("template") / "checkpoint-3"
    folder.mkdir()
    save_ema_files(folder, _trained_ema().state_dict(), run=RUN, global_step=STEP)
    return folder


def _snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (links not followed): its kind and content."""
    seen: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        st_ = os.lstat(path)
        if stat.S_ISLNK(st_.st_mode):
            seen[str(path)] = ("link", os.readlink(path))
        elif stat.S_ISREG(st_.st_mode):
            seen[str(path)] = ("file", path.read_bytes(), st_.st_mtime_ns)
        else:
            seen[str(path)] = (stat.S_IFMT(st_.st_mode), st_.st_mtime_ns)
    return seen


def _clone(state: Any) -> Any:
    """A deep copy of a state dict, tensors cloned."""
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state.clone() if isinstance(state, torch.Tensor) else state


def _states_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_states_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _naive_state(folder: Path) -> dict[str, Any]:
    """What the files say, read without any check (the reference for a load that succeeds)."""
    meta = json.loads((folder / JSON_NAME).read_text())
    state = {**meta["state"], "averages": {n: {} for n in meta["averages"]}, "copied": {}}
    for key, value in load_tensors((folder / meta["tensors"]).read_bytes()).items():
        kind, rest = key.split("/", 1)
        if kind == "copied":
            state["copied"][rest] = value
        else:
            index, name = rest.split("/", 1)
            state["averages"][meta["averages"][int(index)]][name] = value
    return state


@contextlib.contextmanager
def _no_hang(seconds: float = 20.0) -> Iterator[None]:
    """A read that blocks (a fifo, a device) fails the case instead of hanging the run."""

    def hung(*_: Any) -> None:
        raise AssertionError(f"the reader blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _resume_from(folder: Path) -> None:
    """The property, for one mutated folder."""
    root = folder.parent
    before_files = _snapshot(root)
    ema = polyak.EMA(_model(), DECAY)
    before = _clone(ema.state_dict())
    try:
        with _no_hang():
            saved = read_own_files(folder, RUN, STEP, at="the Trainer resumes at")
            load_checked(ema, saved.state, str(saved.path))
    except CheckpointError as e:
        event("refused")
        assert str(folder) in str(e)  # named: the file (or the folder's field) in the message
        assert _states_equal(ema.state_dict(), before)  # all or nothing
    else:  # loaded from the folder's own regular files, and what they say
        event("loaded")
        meta = json.loads((folder / JSON_NAME).read_text())
        for name in (JSON_NAME, meta["tensors"]):
            real = (folder / name).resolve()
            assert real.parent == folder.resolve() and real.is_file(), name
        reference = polyak.EMA(_model(), DECAY)
        reference.load_state_dict(_naive_state(folder))
        assert _states_equal(ema.state_dict(), reference.state_dict())
    assert _snapshot(root) == before_files


def _fresh(template: Path) -> Path:
    """A copy of the valid folder in a new directory, beside a sentinel and a copy of the
    tensor file (what a symlink out of the folder would point at)."""
    root = Path(tempfile.mkdtemp(prefix="polyak-fuzz-"))
    folder = root / "checkpoint-3"
    shutil.copytree(template, folder)
    (root / "sentinel").write_bytes(b"outside the folder: never read, written or deleted")
    meta = json.loads((folder / JSON_NAME).read_text())
    shutil.copy(folder / meta["tensors"], root / "outside.safetensors")
    return folder


def _tiers(strategy: st.SearchStrategy[Any], mutate: Callable[[Path, Any], None]):
    """The fast and the slow test of one property: ``mutate`` a fresh folder, resume from it."""

    def run(template: Path, case: Any) -> None:
        folder = _fresh(template)
        try:
            mutate(folder, case)
            _resume_from(folder)
        finally:
            shutil.rmtree(folder.parent)

    options = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}

    @settings(max_examples=FAST, **options)
    @given(case=strategy)
    def fast(template, case):
        run(template, case)

    @pytest.mark.slow
    @settings(max_examples=DEEP, **options)
    @given(case=strategy)
    def deep(template, case):
        run(template, case)

    return fast, deep


# ----------------------------------------------------------------------- the JSON's fields
_NAMES = [
    "../sentinel",
    "../outside.safetensors",
    "/dev/zero",
    "/etc/passwd",
    "polyak_ema.0123456789abcdef.safetensors",
    "polyak_ema.json",
    "",
    ".",
    "..",
    "a/b",
    "a\\b",
    "x\x00y",
]
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(_NAMES),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _json_fields() -> st.SearchStrategy[Any]:
    folder = Path(tempfile.mkdtemp(prefix="polyak-fuzz-paths-"))
    save_ema_files(folder, _trained_ema().state_dict(), run=RUN, global_step=STEP)
    paths = _paths(json.loads((folder / JSON_NAME).read_text()))
    shutil.rmtree(folder)
    edit = st.tuples(
        st.sampled_from(paths), st.sampled_from(["replace", "delete", "add"]), _JSON_VALUES
    )
    return st.lists(edit, min_size=1, max_size=3)


def _edit_json(folder: Path, edits: list[tuple]) -> None:
    meta = json.loads((folder / JSON_NAME).read_text())
    for path, op, value in edits:
        node = meta
        try:
            for key in path[:-1]:
                node = node[key]
            if op == "replace":
                node[path[-1]] = value
            elif op == "delete":
                del node[path[-1]]
            elif isinstance(node, dict):
                node[f"{path[-1]}_extra"] = value
            elif isinstance(node, list):
                node.append(value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed the path
    (folder / JSON_NAME).write_text(json.dumps(meta))


test_fuzz_json_fields, test_fuzz_json_fields_deep = _tiers(_json_fields(), _edit_json)


# ----------------------------------------------------------------------- the JSON's bytes
def _edit_json_bytes(folder: Path, case: tuple) -> None:
    kind, position, data = case
    raw = (folder / JSON_NAME).read_bytes()
    position %= len(raw)
    if kind == "truncate":
        raw = raw[:position]
    elif kind == "overwrite":
        raw = raw[:position] + data + raw[position + len(data) :]
    elif kind == "insert":
        raw = raw[:position] + data + raw[position:]
    else:
        raw = data
    (folder / JSON_NAME).write_bytes(raw)


test_fuzz_json_bytes, test_fuzz_json_bytes_deep = _tiers(
    st.tuples(
        st.sampled_from(["truncate", "overwrite", "insert", "replace"]),
        st.integers(0, 10**6),
        st.binary(max_size=24)
        | st.sampled_from([b'"', b"}", b"\xff", b"NaN", b"1e999", b"[" * 64]),
    ),
    _edit_json_bytes,
)


# ----------------------------------------------------------------------- the tensor file
def _rewrite_tensors(folder: Path, data: bytes, *, fix: bool) -> None:
    """Put ``data`` in place of the tensor file; with ``fix``, under the name, size and
    checksum the JSON then records (so the reader gets past them to the content)."""
    meta = json.loads((folder / JSON_NAME).read_text())
    old = folder / meta["tensors"]
    if not fix:
        old.write_bytes(data)
        return
    old.unlink()
    digest = hashlib.sha256(data).hexdigest()
    meta.update(tensors=f"polyak_ema.{digest[:16]}.safetensors", bytes=len(data), sha256=digest)
    (folder / meta["tensors"]).write_bytes(data)
    (folder / JSON_NAME).write_text(json.dumps(meta))


def _edit_tensor_bytes(folder: Path, case: tuple) -> None:
    kind, position, data, fix = case
    meta = json.loads((folder / JSON_NAME).read_text())
    raw = (folder / meta["tensors"]).read_bytes()
    position %= len(raw)
    if kind == "flip":
        raw = raw[:position] + bytes([raw[position] ^ 0xFF]) + raw[position + 1 :]
    elif kind == "truncate":
        raw = raw[:position]
    elif kind == "insert":
        raw = raw[:position] + data + raw[position:]
    else:
        raw = raw[:8] + data  # a header length and then anything
    _rewrite_tensors(folder, raw, fix=fix)


test_fuzz_tensor_bytes, test_fuzz_tensor_bytes_deep = _tiers(
    st.tuples(
        st.sampled_from(["flip", "truncate", "insert", "header"]),
        st.integers(0, 10**6),
        st.binary(max_size=32),
        st.booleans(),
    ),
    _edit_tensor_bytes,
)

_KEYS = st.sampled_from(
    [
        "average/0/0.weight",
        "average/1/0.bias",
        "copied/1.num_batches_tracked",
        "average/2/0.weight",
        "average/01/0.weight",
        "average/-1/0.weight",
        "average/99999999999/0.weight",
        "averages/0/x",
        "copied/",
        "copied",
        "average/0/",
        "other/0.weight",
        "average/0/0.weight/x",
    ]
) | st.text(max_size=20).filter(bool)
_DTYPES = st.sampled_from(
    [torch.float16, torch.float64, torch.bfloat16, torch.int64, torch.bool, torch.uint8]
)


def _edit_tensor_content(folder: Path, edits: list[tuple]) -> None:
    meta = json.loads((folder / JSON_NAME).read_text())
    tensors = dict(load_tensors((folder / meta["tensors"]).read_bytes()))
    for kind, index, key, dtype, value in edits:
        names = sorted(tensors)
        if not names:
            break
        name = names[index % len(names)]
        if kind == "rename":
            tensors[key] = tensors.pop(name)
        elif kind == "drop":
            del tensors[name]
        elif kind == "add":
            tensors[key] = torch.zeros(2)
        elif kind == "dtype":
            tensors[name] = tensors[name].to(dtype)
        elif kind == "reshape":
            tensors[name] = tensors[name].reshape(-1)[: max(tensors[name].numel() - 1, 0)].clone()
        else:
            t = tensors[name].clone()
            if t.is_floating_point() and t.numel():
                t.view(-1)[0] = value
            tensors[name] = t
    _rewrite_tensors(folder, save_tensors(tensors, {"run": RUN}), fix=True)


test_fuzz_tensor_content, test_fuzz_tensor_content_deep = _tiers(
    st.lists(
        st.tuples(
            st.sampled_from(["rename", "drop", "add", "dtype", "reshape", "value"]),
            st.integers(0, 100),
            _KEYS,
            _DTYPES,
            st.floats(allow_nan=True, allow_infinity=True, width=32),
        ),
        min_size=1,
        max_size=3,
    ),
    _edit_tensor_content,
)


# ----------------------------------------------------------------------- special files
def _special(folder: Path, case: tuple) -> None:
    """The tensor file or the JSON replaced by a link out of the folder, a device, a fifo, a
    directory, or nothing."""
    target, kind = case
    meta = json.loads((folder / JSON_NAME).read_text())
    path = folder / (JSON_NAME if target == "json" else meta["tensors"])
    if target == "json":  # what a link out of the folder would find: a valid copy
        (folder.parent / "outside.json").write_bytes(path.read_bytes())
    path.unlink()
    outside = folder.parent / ("outside.json" if target == "json" else "outside.safetensors")
    if kind == "link out":
        path.symlink_to(outside)
    elif kind == "relative link out":
        path.symlink_to(Path("..") / outside.name)
    elif kind == "link in":  # inside the folder: allowed
        shutil.copy(outside, folder / "inside.copy")
        path.symlink_to("inside.copy")
    elif kind == "device":  # /dev/zero would be read forever; every system has os.devnull
        path.symlink_to(os.devnull)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling":
        path.symlink_to(folder / "nothing")


test_fuzz_special_files, test_fuzz_special_files_deep = _tiers(
    st.tuples(
        st.sampled_from(["json", "tensors"]),
        st.sampled_from(
            [
                "link out",
                "relative link out",
                "link in",
                "device",
                "fifo",
                "directory",
                "dangling",
                "missing",
            ]
        ),
    ),
    _special,
)


# ----------------------------------------------------------------------- Lightning's entry
_ENTRY_EDITS = st.lists(
    st.tuples(
        st.integers(0, 10**4),
        st.sampled_from(["replace", "delete"]),
        _JSON_VALUES | st.just(torch.ones(2)),
    ),
    min_size=1,
    max_size=3,
)


_ENTRY = make_entry(_clone(_trained_ema().state_dict()), STEP)
_WHERE = "x.ckpt: callbacks['EMACallback']"


def _entry_case(edits: list[tuple]) -> None:
    entry = _clone(_ENTRY)
    paths = _paths(entry)
    for index, op, value in edits:
        path = paths[index % len(paths)]
        node = entry
        try:
            for key in path[:-1]:
                node = node[key]
            if op == "replace":
                node[path[-1]] = value
            else:
                del node[path[-1]]
        except (KeyError, IndexError, TypeError, RuntimeError):
            pass  # an earlier edit removed the path, or put a tensor where it went on
    target = polyak.EMA(_model(), DECAY)
    before = _clone(target.state_dict())
    try:
        checked = check_entry(entry, _WHERE, STEP)
        load_checked(target, checked["ema"], f"{_WHERE}['ema']")
    except CheckpointError as e:
        event("refused")
        assert str(e).startswith(_WHERE)
        assert _states_equal(target.state_dict(), before)
    else:
        event("loaded")
        reference = polyak.EMA(_model(), DECAY)
        reference.load_state_dict(entry["ema"])
        assert _states_equal(target.state_dict(), reference.state_dict())


@settings(max_examples=FAST, deadline=None, database=None)
@given(edits=_ENTRY_EDITS)
def test_fuzz_lightning_entry(edits):
    _entry_case(edits)


@pytest.mark.slow
@settings(max_examples=DEEP, deadline=None, database=None)
@given(edits=_ENTRY_EDITS)
def test_fuzz_lightning_entry_deep(edits):
    _entry_case(edits)
