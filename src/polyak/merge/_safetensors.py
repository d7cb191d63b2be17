"""A safetensors file read lazily: its header checked whole, then any span of a tensor on demand.

The format: an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape
and byte range in the data section, and an optional ``__metadata__`` of strings), then the data.
The header is untrusted: bounded (100 MB, safetensors' own limit, and the file's size), a JSON
object whose every entry has a known dtype, a shape of non-negative integers, and a byte range
of exactly ``prod(shape) * itemsize`` bytes inside the data section, no two ranges overlapping.
Any violation is a :class:`polyak.CheckpointError` naming the file and the tensor. Reads go
through the file descriptor (``pread``) into the caller's buffer, so only the bytes asked for are
read, and no memory map keeps them resident.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard

import torch

from polyak.errors import CheckpointError
from polyak.posthoc.reader import DTYPES

__all__ = ["Entry", "SafetensorsFile", "dtype_code"]

_MAX_HEADER = 100 << 20
_ADVISE = hasattr(os, "posix_fadvise")
_AHEAD = 16 << 20  # bytes asked ahead of the reads: the disk reads large stretches per file
_CODES = {v: k for k, v in DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (``"F32"``); a ``TypeError`` for one it lacks."""
    try:
        return _CODES[dtype]
    except KeyError:
        raise TypeError(f"safetensors has no dtype for {dtype}") from None


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: dtype, shape, and its bytes ``[begin, end)`` in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """An open safetensors file: ``entries`` (checked), ``metadata``, :meth:`read`.

    Args:
        handle: the file opened for reading, unbuffered (:func:`polyak.files.open_regular`);
            this object owns it.
        path: the file's path, for messages.
    """

    def __init__(self, handle: IO[bytes], path: Path) -> None:
        self.path = path
        self._f = handle
        try:
            self.size = os.fstat(handle.fileno()).st_size
            header = self._header()
            self.metadata = self._metadata(header.pop("__metadata__", {}))
            self.entries = self._entries(header)
            self._advised = 0
        except BaseException:
            handle.close()
            raise

    def _fail(self, detail: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {detail}; it is not a valid safetensors file")

    def _pread(self, n: int, at: int) -> bytes:
        data = os.pread(self._f.fileno(), n, at)
        while len(data) < n and (more := os.pread(self._f.fileno(), n - len(data), at + len(data))):
            data += more
        if len(data) < n:
            raise self._fail(f"it ends at byte {at + len(data)}, inside the span it declares")
        return data

    def _header(self) -> dict[str, Any]:
        if self.size < 8:
            raise self._fail(f"it has {self.size} bytes, fewer than the 8 of a header length")
        (n,) = struct.unpack("<Q", self._pread(8, 0))
        if n > min(self.size - 8, _MAX_HEADER):
            raise self._fail(f"its header length {n} exceeds the file or 100 MB")
        try:
            header = json.loads(self._pread(n, 8))
        except (ValueError, RecursionError) as e:
            raise self._fail(f"its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("its header is not a JSON object")
        self.data_start = 8 + n
        return header

    def _metadata(self, meta: Any) -> dict[str, str]:
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise self._fail("its __metadata__ is not an object of strings")
        return meta

    def _entries(self, header: dict[str, Any]) -> dict[str, Entry]:
        data = self.size - self.data_start
        out: dict[str, Entry] = {}
        for name, info in header.items():
            if not isinstance(info, dict):
                raise self._fail(f"the header entry of {name!r} is not an object")
            raw, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            dtype = DTYPES.get(raw) if isinstance(raw, str) else None
            if dtype is None:
                raise self._fail(f"tensor {name!r} has the dtype {raw!r}, which polyak cannot read")
            if not (_ints(shape) and _ints(offsets) and len(offsets) == 2):
                raise self._fail(f"tensor {name!r} has a malformed shape or data_offsets")
            assert isinstance(shape, list) and isinstance(offsets, list)
            begin, end = offsets
            if not begin <= end <= data or end - begin != math.prod(shape) * dtype.itemsize:
                raise self._fail(
                    f"tensor {name!r} of shape {shape} ({raw}) has the byte range "
                    f"[{begin}, {end}), not {math.prod(shape) * dtype.itemsize} bytes inside "
                    f"the {data} of the data section"
                )
            out[name] = Entry(dtype, tuple(shape), begin, end)
        spans = sorted((e.begin, e.end, n) for n, e in out.items() if e.end > e.begin)
        for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
            if begin < end:
                raise self._fail(f"the bytes of tensors {a!r} and {b!r} overlap")
        return out

    def read(self, name: str, begin: int, end: int, buffer: bytearray) -> torch.Tensor:
        """Elements ``[begin, end)`` of tensor ``name`` (flattened), read into ``buffer`` (large
        enough) and returned as a tensor that views it."""
        e = self.entries[name]
        size = e.dtype.itemsize
        n = (end - begin) * size
        view = memoryview(buffer)[:n]
        at = self.data_start + e.begin + begin * size
        if _ADVISE and at + n > self._advised - _AHEAD // 2:
            # the merge reads every file front to back, a span at a time from each in turn:
            # let the kernel fetch the next stretch of this one while the others are read
            os.posix_fadvise(self._f.fileno(), at, _AHEAD, os.POSIX_FADV_WILLNEED)
            self._advised = at + _AHEAD
        got = 0
        while got < n:
            k = os.preadv(self._f.fileno(), [view[got:]], at + got)
            if not k:
                raise self._fail(f"it ends inside tensor {name!r}")
            got += k
        return (
            torch.frombuffer(buffer, dtype=e.dtype, count=end - begin)
            if n
            else torch.empty(0, dtype=e.dtype)
        )

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ints(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )
