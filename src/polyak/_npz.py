"""A state dict as one ``.npz`` file, written atomically and read back without pickle (core).

A state dict of nested dicts and lists, NumPy arrays and JSON values (strings, numbers, booleans,
``None``) becomes a zip archive of ``state.json`` (the tree, each array replaced by
``{"__array__": i}``) and ``arrays/<i>.npy``, uncompressed, each a plain ``.npy`` file:
``np.load(path, allow_pickle=False)`` opens it too. The file is written through
:class:`polyak.files.Outputs` (temporary file, fsync, rename), so a crash leaves the old file or
the new one.

Reading treats the file as untrusted: a regular file, a zip holding only those members, stored
uncompressed (so no member is larger than the file), bounded JSON, every array header checked
(a plain numeric dtype, a shape whose size matches the member's) before its data is read, every
array referenced once. Anything else is a :class:`polyak.CheckpointError` naming the file and
the member; nothing is unpickled, and memory stays within the file's size.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from polyak.errors import CheckpointError, NonFiniteError
from polyak.files import MAX_JSON_BYTES, Outputs

__all__ = ["load_npz", "save_npz"]

T = TypeVar("T")

_JSON = "state.json"
_ARRAY = re.compile(r"arrays/(\d{1,9})\.npy")
_MARK = "__array__"
_CHUNK = 1 << 24
_FLAGS = 0x08 | 0x800  # the general-purpose flags allowed: data descriptor, UTF-8 name


def save_npz(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` (the exact name: no ``.npz`` is appended), atomically.

    Raises:
        TypeError: a value that is neither an array nor JSON data (named by its place).
    """
    arrays: list[np.ndarray] = []

    def encode(x: Any, where: str) -> Any:
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biufc" or x.dtype.fields is not None:
                raise TypeError(f"{where}: an array of dtype {x.dtype} cannot be saved")
            arrays.append(x)
            return {_MARK: len(arrays) - 1}
        if isinstance(x, Mapping):
            if not all(isinstance(k, str) for k in x) or _MARK in x:
                raise TypeError(
                    f"{where}: keys must be strings other than {_MARK!r}, got {list(x)!r:.80}"
                )
            return {k: encode(v, f"{where}[{k!r}]") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (str, bool, int, float)):
            return x
        raise TypeError(f"{where}: a {type(x).__name__} cannot be saved (arrays and JSON only)")

    tree = json.dumps(encode(state, "state")).encode("utf-8")
    with Outputs() as out:
        tmp = out.stage(path)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(_JSON, tree)
            for i, a in enumerate(arrays):
                with zf.open(f"arrays/{i}.npy", "w", force_zip64=a.nbytes >= 1 << 30) as f:
                    np.lib.format.write_array(f, a, allow_pickle=False)
        out.commit()


_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
# what zipfile and the .npy header parser raise on damaged bytes
_DAMAGED = (
    zipfile.BadZipFile,
    EOFError,
    OSError,
    ValueError,
    SyntaxError,
    TypeError,
    NotImplementedError,
    RuntimeError,
)


def _read_array(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    """One member's array: its header checked against the member's size before any data is
    read, so a crafted shape cannot make us allocate more than the file holds."""
    try:
        with zf.open(info) as f:
            header = _HEADERS.get(np.lib.format.read_magic(f))
            if header is None:
                raise CheckpointError(f"{where}: a .npy format version polyak does not write")
            shape, fortran, dtype = header(f, max_header_size=10_000)
            if dtype.kind not in "biufc" or dtype.fields is not None or dtype.hasobject:
                raise CheckpointError(f"{where}: dtype {dtype} is not a plain numeric dtype")
            nbytes = math.prod(shape) * dtype.itemsize
            if f.tell() + nbytes != info.file_size:
                raise CheckpointError(
                    f"{where}: the header says {shape} {dtype} ({nbytes} bytes) but the member "
                    f"holds {info.file_size - f.tell()} bytes of data"
                )
            buf = bytearray(nbytes)
            done = 0
            while done < nbytes:  # reaching the end also checks the CRC-32
                chunk = f.read(min(nbytes - done, _CHUNK))
                if not chunk:
                    raise CheckpointError(f"{where}: truncated")
                buf[done : done + len(chunk)] = chunk
                done += len(chunk)
    except CheckpointError:
        raise
    except _DAMAGED as e:
        raise CheckpointError(f"{where}: damaged ({type(e).__name__}: {e})") from None
    a = np.frombuffer(buf, dtype=dtype)
    return a.reshape(shape, order="F" if fortran else "C")


def load_npz(path: str | os.PathLike[str], load: Callable[[Any], T]) -> T:
    """``load(state)`` of the state dict :func:`save_npz` wrote to ``path``, every part of the
    file checked first; ``load`` (a ``load_state_dict``) checks the fields.

    Raises:
        FileNotFoundError: no such file.
        NonFiniteError: from ``load``, with the file named.
        CheckpointError: anything else wrong with the file or raised by ``load`` as a
            ``ValueError`` / ``TypeError``, naming the file and the member or field.
    """
    state = _read(Path(path))
    try:
        return load(state)
    except NonFiniteError as e:
        raise NonFiniteError(f"{path}: {e}", e.names) from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _read(path: Path) -> Any:
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError(f"{path} is not a regular file; refusing to read it")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.LargeZipFile, *_DAMAGED) as e:
        raise CheckpointError(f"{path} is not a polyak .npz state file ({e})") from None
    with zf:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            where = f"{path}, member {info.filename!r}"
            if info.filename != _JSON and not _ARRAY.fullmatch(info.filename):
                raise CheckpointError(f"{where}: not a member of a polyak state file")
            if (
                info.compress_type != zipfile.ZIP_STORED
                or info.flag_bits & ~_FLAGS  # encrypted, patched data...
                or info.filename in members
            ):
                raise CheckpointError(
                    f"{where}: compressed, encrypted, flagged or repeated; polyak writes none "
                    "of these"
                )
            members[info.filename] = info
        if _JSON not in members:
            raise CheckpointError(f"{path} has no {_JSON}; it is not a polyak .npz state file")
        if members[_JSON].file_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}, member {_JSON!r}: larger than {MAX_JSON_BYTES} bytes")
        try:
            tree = json.loads(zf.read(_JSON).decode("utf-8"))
        except (UnicodeDecodeError, RecursionError, *_DAMAGED) as e:  # JSONDecodeError too
            raise CheckpointError(f"{path}, member {_JSON!r}: not valid JSON ({e})") from None
        used: set[str] = set()

        def decode(x: Any, where: str) -> Any:
            if isinstance(x, dict) and _MARK in x:
                i = x[_MARK]
                name = f"arrays/{i}.npy"
                if len(x) != 1 or isinstance(i, bool) or not isinstance(i, int):
                    raise CheckpointError(
                        f"{path}: {where} is a malformed array reference {x!r:.80}"
                    )
                if name not in members or name in used:
                    raise CheckpointError(f"{path}: {where} refers to a missing or reused {name}")
                used.add(name)
                return _read_array(zf, members[name], f"{path}, member {name!r} ({where})")
            if isinstance(x, dict):
                return {k: decode(v, f"{where}[{k!r}]") for k, v in x.items()}
            if isinstance(x, list):
                return [decode(v, f"{where}[{i}]") for i, v in enumerate(x)]
            return x

        try:
            state = decode(tree, "state")
        except RecursionError:
            raise CheckpointError(f"{path}, member {_JSON!r}: nested too deeply") from None
        unused = sorted(set(members) - used - {_JSON})
        if unused:
            raise CheckpointError(f"{path}: members {unused[:5]} are not part of the state")
    return state
