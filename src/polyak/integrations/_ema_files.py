"""An ``EMA.state_dict()`` as two files in a checkpoint directory, written atomically.

* ``polyak_ema.safetensors``: the tensors (``average/<i>/<tensor name>`` for the ``i``-th
  average, ``copied/<tensor name>``), loaded without unpickling anything;
* ``polyak_ema.json``: everything else (format, dtype, step counters and schedule state, the
  averages' names), the run identity and the SHA-256 of the tensor file.

Each file is written to a temporary name in the same directory, flushed, fsynced and renamed;
the JSON goes last and names the tensor file's checksum, so a pair from different runs or a
half-written tensor file is detected on loading instead of resuming from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["JSON_NAME", "TENSORS_NAME", "load_ema_files", "save_ema_files"]

TENSORS_NAME = "polyak_ema.safetensors"
JSON_NAME = "polyak_ema.json"
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
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "run": run,
        "tensors": TENSORS_NAME,
        "sha256": hashlib.sha256(data).hexdigest(),
        "averages": names,
        "state": {k: state[k] for k in ("format", "version", "dtype", "timeline")},
    }
    _write_atomic(directory / TENSORS_NAME, data)
    _write_atomic(directory / JSON_NAME, json.dumps(meta, indent=1).encode())


def load_ema_files(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """``(state dict, run identity)`` from the files :func:`save_ema_files` wrote."""
    from safetensors.torch import load

    directory = Path(directory)
    meta_path, tensors_path = directory / JSON_NAME, directory / TENSORS_NAME
    for path in (meta_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint holds no polyak EMA state (it was written "
                "without EMACallback, or the run stopped before the callback's on_save)"
            )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"{meta_path} is not a {_FORMAT} v{_VERSION} file")
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
