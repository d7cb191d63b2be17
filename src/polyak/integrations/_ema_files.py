"""An ``EMA.state_dict()`` as two files in a checkpoint directory, written atomically.

* ``polyak_ema.<hash>.safetensors``: the tensors (``average/<i>/<tensor name>`` for the
  ``i``-th average, ``copied/<tensor name>``), loaded without unpickling anything;
* ``polyak_ema.json``: everything else (format, dtype, step counters and schedule state, the
  averages' names), the run identity, and the name and SHA-256 of the tensor file.

Each file is written to a temporary name in the same directory, flushed, fsynced and renamed.
The tensor file's name carries its hash, so it never replaces the file the current JSON names;
renaming the JSON is the one step that switches to the new state, and the old tensor file is
removed after it. A failure at any point leaves the previous pair loadable, and a damaged or
mismatched tensor file is detected on loading instead of resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["JSON_NAME", "load_ema_files", "save_ema_files"]

JSON_NAME = "polyak_ema.json"
_TENSORS = "polyak_ema.{}.safetensors"
_FORMAT, _VERSION = "polyak.EMA files", 1


def save_ema_files(directory: str | os.PathLike[str], state: Mapping[str, Any], run: str) -> None:
    """Write ``state`` (``EMA.state_dict()`` or ``full_state_dict()``) into ``directory``."""
    from safetensors.torch import save

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save the EMA state: {directory} is not a directory")
    if "shards" in state:
        raise ValueError("save the full_state_dict() of a sharded EMA, not its shards")
    names = list(state["averages"])
    tensors = {
        f"average/{i}/{k}": v for i, n in enumerate(names) for k, v in state["averages"][n].items()
    }
    tensors.update({f"copied/{k}": v for k, v in state["copied"].items()})
    # views of one flat buffer share a storage, which safetensors refuses: one copy each, on CPU
    data = save({k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, {"run": run})
    digest = hashlib.sha256(data).hexdigest()
    name = _TENSORS.format(digest[:16])
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "run": run,
        "tensors": name,
        "sha256": digest,
        "averages": names,
        "state": {k: state[k] for k in ("format", "version", "dtype", "timeline")},
    }
    _write_atomic(directory / name, data)
    _write_atomic(directory / JSON_NAME, json.dumps(meta, indent=1).encode())  # the switch
    for old in directory.glob(_TENSORS.format("*")):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_ema_files(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """``(state dict, run identity)`` from the files :func:`save_ema_files` wrote."""
    from safetensors.torch import load

    meta_path = Path(directory) / JSON_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} is missing: this checkpoint holds no polyak EMA state (it was written "
            "without EMACallback, or the run stopped before the callback's on_save)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"{meta_path} is not a {_FORMAT} v{_VERSION} file")
    tensors_path = meta_path.parent / meta["tensors"]
    if not tensors_path.is_file():
        raise FileNotFoundError(f"{tensors_path}, named by {meta_path}, is missing")
    data = tensors_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(
            f"{tensors_path} does not match the checksum in {meta_path} (a partial write, or "
            "files of different runs)"
        )
    tensors = load(data)
    state: dict[str, Any] = {**meta["state"], "averages": {n: {} for n in meta["averages"]}}
    state["copied"] = {}
    for key, value in tensors.items():
        kind, rest = key.split("/", 1)
        if kind == "copied":
            state["copied"][rest] = value
        else:
            index, name = rest.split("/", 1)
            state["averages"][meta["averages"][int(index)]][name] = value
    return state, meta["run"]


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
