"""An ``EMA.state_dict()`` as two files in a checkpoint folder, written atomically, read as
untrusted input.

* ``polyak_ema.<16 hex>.safetensors``: the tensors (``average/<i>/<tensor name>`` for the
  ``i``-th average, ``anchor/<i>/<tensor name>`` for its anchor when it is a BEMA average,
  ``copied/<tensor name>``), loaded without unpickling anything; the 16 hex
  digits are the start of the file's SHA-256;
* ``polyak_ema.json``: everything else (format, dtype, step counters and schedule state, the
  averages' names), the identity of the state (the run and the trainer's global step it was
  saved at), and the name, size and SHA-256 of the tensor file.

Writing: the tensor file first, then the JSON (both through :mod:`polyak.files`: temporary
file, fsync, rename). The tensor file's name carries its hash, so it never replaces the file
the current JSON names; renaming the JSON is the one step that switches to the new state. Old
tensor files are removed after it, only names of the writer's own pattern, checked again at
deletion. A failure at any point leaves the previous pair loadable.

Reading (:func:`read_ema_files`) trusts nothing in the folder: the JSON is read bounded and
checked against its schema (types, ranges, required and unknown keys, format version) before
any field is used; the tensor file name must be a plain name of the writer's pattern, resolve
to a regular file inside the folder (no symlink out of it, no device or fifo) and have the size
and SHA-256 the JSON records; the tensor keys are parsed strictly. Every violation is one
:class:`polyak.CheckpointError` naming the file and field. Whether the state belongs to the
run and step being resumed is the caller's check (:mod:`polyak.integrations.transformers`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from polyak.errors import CheckpointError
from polyak.files import plain_name, read_json, regular_file, write_bytes_atomic, write_json_atomic

__all__ = ["JSON_NAME", "RUN", "EMAFiles", "read_ema_files", "save_ema_files"]

JSON_NAME = "polyak_ema.json"
TENSORS = re.compile(r"polyak_ema\.[0-9a-f]{16}\.safetensors")
RUN = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: the run identity the callbacks write
_FORMAT, _VERSION = "polyak.EMA files", 2
_MAX_JSON = 4 << 20  # counters, schedule states and names: kilobytes
_KEY = re.compile(r"(?:(average|anchor)/(0|[1-9][0-9]{0,8})|copied)/(.+)", re.DOTALL)
_FIELDS = ("format", "version", "run", "global_step", "tensors", "bytes", "sha256", "averages")
_STATE_FIELDS = {"format": str, "version": int, "dtype": str, "timeline": dict}
_KINDS = {int: "an int", str: "a string", list: "a list", dict: "an object"}
_REPAIR = (
    "put back the polyak_ema.json and polyak_ema.<hash>.safetensors this checkpoint was saved "
    "with, or resume from another checkpoint"
)


class EMAFiles(NamedTuple):
    """What :func:`read_ema_files` returns: the state and its identity."""

    state: dict[str, Any]  #: ``EMA.state_dict()`` format, tensors on the CPU
    run: str  #: the run that saved it (32 hex digits)
    global_step: int  #: the trainer's global step it was saved at
    path: Path  #: the JSON file, for messages


def save_ema_files(
    directory: str | os.PathLike[str], state: Mapping[str, Any], *, run: str, global_step: int
) -> None:
    """Write ``state`` (``EMA.state_dict()``, with ``full=True`` when sharded) into ``directory``.

    Args:
        run: the run identity (32 lowercase hex digits, ``uuid.uuid4().hex``).
        global_step: the trainer's global step the state belongs to.
    """
    from safetensors.torch import save

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save the EMA state: {directory} is not a directory")
    if "shards" in state:
        raise ValueError("save the state_dict(full=True) of a sharded EMA, not its shards")
    if not isinstance(run, str) or not RUN.fullmatch(run):
        raise ValueError(f"run must be 32 lowercase hex digits (uuid4().hex), got {run!r}")
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
        raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
    names = list(state["averages"])
    tensors = {
        f"average/{i}/{k}": v for i, n in enumerate(names) for k, v in state["averages"][n].items()
    }
    tensors.update({f"copied/{k}": v for k, v in state["copied"].items()})
    for n, table in state.get("anchors", {}).items():
        tensors.update({f"anchor/{names.index(n)}/{k}": v for k, v in table.items()})
    # views of one flat buffer share a storage, which safetensors refuses: one copy each, on CPU
    data = save({k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, {"run": run})
    digest = hashlib.sha256(data).hexdigest()
    name = f"polyak_ema.{digest[:16]}.safetensors"
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "run": run,
        "global_step": global_step,
        "tensors": name,
        "bytes": len(data),
        "sha256": digest,
        "averages": names,
        "state": {k: state[k] for k in _STATE_FIELDS},
    }
    write_bytes_atomic(directory / name, data)
    write_json_atomic(directory / JSON_NAME, meta)  # the switch
    _remove_old_tensors(directory, keep=name)


def _remove_old_tensors(directory: Path, keep: str) -> None:
    """Remove the tensor files of earlier saves: names of the writer's pattern only, each
    checked again when removed (a file or a symlink, never a directory); a symlink is removed,
    not what it points to. A failure leaves the file for the next save to remove."""
    with os.scandir(directory) as entries:
        old = [e.name for e in entries if e.name != keep and TENSORS.fullmatch(e.name)]
    for name in old:
        path = directory / name  # a listed name of the pattern: plain, inside the folder
        try:
            mode = os.lstat(path).st_mode  # now, not when listed
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                os.unlink(path)
        except OSError:
            pass  # the new state is already committed; an orphan is harmless


def read_ema_files(directory: str | os.PathLike[str]) -> EMAFiles:
    """The state :func:`save_ema_files` wrote into ``directory``, checked before use.

    Raises:
        CheckpointError: a file missing, malformed, unsafe or damaged; the message names the
            file and the field and says what to do.
    """
    directory = Path(directory)
    path = directory / JSON_NAME
    try:  # a symlink out of the folder is refused like any name read from it
        regular_file(directory, JSON_NAME, what="the EMA state file")
    except FileNotFoundError:
        raise _missing_json(path) from None
    meta = _check_meta(read_json(path, max_bytes=_MAX_JSON, missing=_missing_json), path)
    name = plain_name(meta["tensors"], what="the field 'tensors'", where=path, pattern=TENSORS)
    if name[len("polyak_ema.") : -len(".safetensors")] != meta["sha256"][:16]:
        raise CheckpointError(
            f"{path}: the field 'tensors' ({name!r}) does not carry the start of the field "
            f"'sha256' ({meta['sha256'][:16]}...); the files were edited: {_REPAIR}"
        )
    data = _read_tensor_file(directory, name, meta["bytes"], path)
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(
            f"{directory / name} does not match the field 'sha256' of {path} (a partial write, a "
            f"damaged file, or files of different saves): {_REPAIR}"
        )
    state = _state(meta, _parse_tensors(data, directory / name), path)
    return EMAFiles(state, meta["run"], meta["global_step"], path)


def _missing_json(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is missing: this checkpoint holds no polyak EMA state (it was written without "
        "EMACallback, or the run stopped before the callback's on_save); resume from a "
        "checkpoint the callback saved"
    )


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """``meta`` if it has the schema :func:`save_ema_files` writes, else a named error."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise CheckpointError(
            f"{path}: not a {_FORMAT!r} file of version {_VERSION} (the fields 'format' and "
            f"'version' are {meta.get('format')!r:.60} and {meta.get('version')!r:.20}); it was "
            "written by another polyak version or another program: resume it with the polyak "
            "that wrote it, or from a checkpoint this version saved"
        )
    unknown = sorted(set(meta) - {*_FIELDS, "state"})
    missing = [k for k in (*_FIELDS, "state") if k not in meta]
    if unknown or missing:
        raise CheckpointError(
            f"{path}: the fields {missing} are missing and {str(unknown)[:200]} unknown; {_REPAIR}"
        )
    _expect(meta["run"], str, path, "run", RUN)
    _expect(meta["sha256"], str, path, "sha256", re.compile(r"[0-9a-f]{64}"))
    for key in ("global_step", "bytes"):
        if _expect(meta[key], int, path, key) < 0:
            raise CheckpointError(f"{path}: the field {key!r} is negative ({meta[key]}); {_REPAIR}")
    averages = _expect(meta["averages"], list, path, "averages")
    for i, name in enumerate(averages):
        _expect(name, str, path, f"averages[{i}]")
    if not averages or len(set(averages)) != len(averages):
        raise CheckpointError(
            f"{path}: the field 'averages' must name each average once, got {averages!r:.200}; "
            f"{_REPAIR}"
        )
    state = _expect(meta["state"], dict, path, "state")
    if set(state) - set(_STATE_FIELDS):
        raise CheckpointError(
            f"{path}: the field 'state' holds unknown fields "
            f"{str(sorted(set(state) - set(_STATE_FIELDS)))[:200]}; {_REPAIR}"
        )
    for key, kind in _STATE_FIELDS.items():
        if key not in state:
            raise CheckpointError(f"{path}: the field 'state.{key}' is missing; {_REPAIR}")
        _expect(state[key], kind, path, f"state.{key}")
    return meta


def _expect(
    value: Any, kind: type, path: Path, field: str, pattern: re.Pattern[str] | None = None
) -> Any:
    """``value`` if it is a ``kind`` (an int is never a bool) matching ``pattern`` in full."""
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if ok and pattern is not None:
        ok = pattern.fullmatch(value) is not None
    if not ok:
        form = _KINDS[kind] if pattern is None else f"a string of the form {pattern.pattern}"
        raise CheckpointError(
            f"{path}: the field {field!r} must be {form}, got {value!r:.80}; {_REPAIR}"
        )
    return value


def _read_tensor_file(directory: Path, name: str, size: int, where: Path) -> bytes:
    """The bytes of ``directory / name``: a regular file inside the folder, of ``size`` bytes.

    The file is opened without blocking (a fifo put there after the check cannot hang the
    read) and checked again through its descriptor before a byte is read.
    """
    path = directory / name
    try:
        regular_file(directory, name, what=f"the tensor file named by {where}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise CheckpointError(
                    f"{path} is not a regular file of {size} bytes (the field 'bytes' of "
                    f"{where}), it has {st.st_size}: {_REPAIR}"
                )
            data = f.read(size + 1)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}, named by the field 'tensors' of {where}, is missing: {_REPAIR}"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e}): {_REPAIR}") from None
    if len(data) != size:
        raise CheckpointError(f"{path} changed size while read: {_REPAIR}")
    return data


def _parse_tensors(data: bytes, path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); {_REPAIR}") from e


def _state(meta: Mapping[str, Any], tensors: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The state dict: the JSON's state with the tensors put back under their averages."""
    names = meta["averages"]
    state: dict[str, Any] = {**meta["state"], "averages": {n: {} for n in names}, "copied": {}}
    anchors: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or (match[2] is not None and int(match[2]) >= len(names)):
            raise CheckpointError(
                f"{path}: the tensor key {key!r:.120} is not 'average/<i>/<name>' or "
                f"'anchor/<i>/<name>' with i < {len(names)} (the averages in "
                f"{path.with_name(JSON_NAME)}) nor 'copied/<name>'; {_REPAIR}"
            )
        if match[1] is None:
            table = state["copied"]
        elif match[1] == "anchor":
            table = anchors.setdefault(names[int(match[2])], {})
        else:
            table = state["averages"][names[int(match[2])]]
        table[match[3]] = value
    if anchors:
        state["anchors"] = anchors
    return state
