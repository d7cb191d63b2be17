"""Reading one snapshot file front to back, its CRC-32 computed on the way.

The files are safetensors: an 8-byte little-endian header length, a JSON header with each
tensor's dtype, shape and byte range, and the tensors' bytes, contiguous, in that order. Read in
that order, a file's checksum comes for free with the one read the reconstruction needs, and is
checked against the manifest before any result is returned.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from polyak.posthoc import store

__all__ = ["Entry", "Stream", "layout_key"]

_ADVISE = hasattr(os, "posix_fadvise")
_AHEAD = 16 << 20  # bytes per file asked ahead of the reads

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int

    @property
    def numel(self) -> int:
        return (self.end - self.begin) // self.dtype.itemsize


class Stream:
    """One snapshot file read front to back, its CRC-32 computed on the way."""

    def __init__(self, file: store.SnapshotFile) -> None:
        self.file = file
        try:
            self._f: io.FileIO = open(file.path, "rb", buffering=0)  # noqa: SIM115 - see close()
        except FileNotFoundError:
            raise store.ChecksumError(file.path, file.step, "the file is missing") from None
        self.crc, self.pos, self.in_order, self._advised = 0, 0, True, 0
        try:
            head = self._read_exact(8)
            (n,) = struct.unpack("<Q", head)
            if n > file.size:
                raise store.ChecksumError(file.path, file.step, "the header length is corrupt")
            text = self._read_exact(n)
            header = json.loads(text)
        except (ValueError, struct.error) as e:
            self._f.close()
            raise store.ChecksumError(file.path, file.step, f"unreadable header ({e})") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", {})
        entries = []
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise store.StoreError(f"{file.path}: unsupported dtype {info['dtype']} ({name})")
            begin, end = info["data_offsets"]
            entries.append(Entry(name, _DTYPES[info["dtype"]], tuple(info["shape"]), begin, end))
        self.entries = sorted(entries, key=lambda e: e.begin)

    def _read_exact(self, n: int) -> bytes:
        data = self._f.read(n) or b""
        while len(data) < n and (more := self._f.read(n - len(data))):
            data += more
        if len(data) < n:
            raise store.ChecksumError(self.file.path, self.file.step, "the file is truncated")
        self.crc = zlib.crc32(data, self.crc)
        self.pos += n
        return data

    def read_into(self, begin: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes at data offset ``begin``."""
        at = self.data_start + begin
        if _ADVISE and at + len(out) > self._advised - _AHEAD // 2:
            # let the kernel fetch the next stretch while we convert and multiply this one
            os.posix_fadvise(self._f.fileno(), at, _AHEAD, os.POSIX_FADV_WILLNEED)
            self._advised = at + _AHEAD
        if at != self.pos:
            self.in_order = False  # verified by a separate pass in finish()
            self._f.seek(at)
        got = 0
        while got < len(out):
            n = self._f.readinto(out[got:])
            if not n:
                raise store.ChecksumError(self.file.path, self.file.step, "the file is truncated")
            got += n
        if self.in_order:
            self.crc = zlib.crc32(out, self.crc)
        self.pos = at + got

    def finish(self) -> None:
        """Check the whole file against the manifest (size and CRC-32), then close it."""
        try:
            if self.in_order:
                while chunk := self._f.read(1 << 20):  # bytes past the last tensor, if any
                    self.crc = zlib.crc32(chunk, self.crc)
                    self.pos += len(chunk)
                store.check(self.file, self.crc, self.pos)
            else:
                store.verify(self.file)
        finally:
            self.close()

    def close(self) -> None:
        self._f.close()


def layout_key(s: Stream) -> list[tuple[Any, ...]]:
    """What must agree between the files combined: names, dtypes, shapes, sizes, order."""
    return [(e.name, e.dtype, e.shape, e.end - e.begin) for e in s.entries]
