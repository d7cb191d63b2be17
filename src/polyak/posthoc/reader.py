"""Reading one snapshot file front to back: its header checked, its checksum computed on the way.

The files are safetensors: an 8-byte little-endian header length, a JSON header with each
tensor's dtype, shape and byte range, and the tensors' bytes, contiguous, in that order. The
header is untrusted like the manifest: it must list exactly the tensors of the manifest's
``tensors`` table, each with its shape and dtype (a file lacking ``0.weight`` is an error naming
the file and the tensor, never a shorter result), byte ranges that tile the data section
exactly, and the step, average and run id of its manifest entry in its metadata. Read in order,
a file's checksum comes for free with the one read the reconstruction needs, and is checked
against the manifest before any result is returned.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch

from polyak.posthoc.checksum import Checksum
from polyak.posthoc.errors import ChecksumError, StoreError
from polyak.posthoc.reading import Pins
from polyak.posthoc.store import SnapshotFile

__all__ = ["Entry", "Layout", "Stream", "layout_key", "verify"]

_ADVISE = hasattr(os, "posix_fadvise")
_AHEAD = 16 << 20  # bytes per file asked ahead of the reads
_REST = 1 << 20
_MAX_HEADER = 100 << 20  # safetensors' own limit

DTYPES = {
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

#: ``{tensor name: (dtype, shape)}`` a file must hold; a dtype of ``None`` is not recorded (the
#: copied tensors of a version-1 manifest: the files are compared with each other instead)
Layout = dict[str, tuple[torch.dtype | None, tuple[int, ...]]]


def layout_of(manifest: dict[str, Any]) -> Layout:
    """The tensors every file of a (validated) manifest holds."""
    stored = getattr(torch, manifest["snapshot_dtype"])
    out: Layout = {}
    for name, info in manifest["tensors"].items():
        if info["kind"] == "average":
            dtype: torch.dtype | None = stored
        else:
            dtype = getattr(torch, info["dtype"]) if "dtype" in info else None
        out[name] = (dtype, tuple(info["shape"]))
    return out


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
    """One snapshot file read front to back, its header checked, its checksum computed."""

    def __init__(self, file: SnapshotFile, layout: Layout, pins: Pins | None = None) -> None:
        self.file = file
        self.check = Checksum(file.algorithm)  # before the open: may raise ImportError
        self._f = file.open() if pins is None else pins.open(file)
        self.pos, self.in_order, self._advised = 0, True, 0
        try:
            (n,) = struct.unpack("<Q", self._read_exact(8))
            if n > min(file.size - 8, _MAX_HEADER):
                raise ChecksumError(file.path, file.step, "the header length is corrupt", file=file)
            try:
                header = json.loads(self._read_exact(n))
            except (ValueError, RecursionError) as e:
                raise ChecksumError(
                    file.path, file.step, f"unreadable header ({e})", file=file
                ) from None
            self.data_start = 8 + n
            self.entries = self._entries(header, layout)
        except BaseException:
            self._f.close()
            raise

    def _fail(self, detail: str) -> StoreError:
        f = self.file
        return StoreError(
            f"snapshot file {f.path} (step {f.step}, {f.key}) {detail}; it does not match its "
            f"manifest {f.manifest.name}: restore the file (or the manifest)",
            file=f,
        )

    def _entries(self, header: Any, layout: Layout) -> list[Entry]:
        if not isinstance(header, dict):
            raise self._fail("has a header that is not a JSON object")
        meta = header.pop("__metadata__", {})
        f = self.file
        own = {"step": str(f.step), "average": f.key, "run_id": f.run_id}
        if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in own.items()):
            raise self._fail(f"has the metadata {_cut(meta)}, not those of its entry {own}")
        missing = [n for n in layout if n not in header]
        if missing:
            raise self._fail(f"lacks the tensor {missing[0]!r} (of {len(missing)} missing)")
        extra = [n for n in header if n not in layout]
        if extra:
            raise self._fail(f"holds the tensor {extra[0]!r}, which the manifest does not list")
        entries = [self._entry(name, header[name], layout[name]) for name in layout]
        entries.sort(key=lambda e: (e.begin, e.end))
        end = 0
        for e in entries:  # the byte ranges tile the data section (empty tensors: anywhere)
            if e.begin != end and (e.begin < e.end or e.begin > f.size - self.data_start):
                raise self._fail(f"has the bytes of {e.name!r} at {e.begin}, expected {end}")
            end = max(end, e.end)
        if self.data_start + end != f.size:
            raise self._fail(f"has {f.size - self.data_start} bytes of data, its header {end}")
        return entries

    def _entry(self, name: str, info: Any, expected: tuple[torch.dtype | None, tuple]) -> Entry:
        if not isinstance(info, dict):
            raise self._fail(f"has a malformed header entry for {name!r}: {_cut(info)}")
        raw, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dtype = DTYPES.get(raw) if isinstance(raw, str) else None
        if not (_ints(shape) and _ints(offsets) and len(offsets) == 2):
            raise self._fail(f"has a malformed header entry for {name!r}: {_cut(info)}")
        want_dtype, want_shape = expected
        if dtype is None or (want_dtype is not None and dtype != want_dtype):
            raise self._fail(f"holds {name!r} as {_cut(raw)}, the manifest says {want_dtype}")
        if tuple(shape) != want_shape:
            raise self._fail(
                f"holds {name!r} of shape {shape}, the manifest says {list(want_shape)}"
            )
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise self._fail(f"has {end - begin} bytes for {name!r} of shape {shape}")
        return Entry(name, dtype, tuple(shape), begin, end)

    def _read_exact(self, n: int) -> bytes:
        data = self._f.read(n) or b""
        while len(data) < n and (more := self._f.read(n - len(data))):
            data += more
        if len(data) < n:
            raise self._truncated()
        self.check.update(data)
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
            n = self._f.readinto(out[got:])  # type: ignore[attr-defined]
            if not n:
                raise self._truncated()
            got += n
        if self.in_order:
            self.check.update(out)
        self.pos = at + got

    def _truncated(self) -> ChecksumError:
        return ChecksumError(
            self.file.path, self.file.step, "the file is truncated", file=self.file
        )

    def finish(self) -> None:
        """Check the whole file against the manifest (size and checksum), then close it."""
        try:
            if not self.in_order:
                self.check, self.pos = Checksum(self.file.algorithm), 0
            self._f.seek(self.pos)
            buf = bytearray(_REST)
            while n := self._f.readinto(buf):  # type: ignore[attr-defined]
                self.check.update(memoryview(buf)[:n])
                self.pos += n
            _compare(self.file, self.check.value, self.pos)
        finally:
            self.close()

    def close(self) -> None:
        self._f.close()


def _compare(file: SnapshotFile, value: int, size: int) -> None:
    if size != file.size:
        raise ChecksumError(
            file.path, file.step, f"{size} bytes, the manifest says {file.size}", file=file
        )
    if value != file.checksum:
        name = file.algorithm.upper().replace("CRC32", "CRC-32")
        raise ChecksumError(
            file.path,
            file.step,
            f"{name} {value:08x}, the manifest says {file.checksum:08x}",
            file=file,
        )


def verify(file: SnapshotFile, layout: Layout, pins: Pins | None = None) -> None:
    """Check one file whole: its header against ``layout``, its size and checksum (one read)."""
    Stream(file, layout, pins).finish()


def layout_key(s: Stream) -> list[tuple[Any, ...]]:
    """What must agree between the files combined: names, dtypes, shapes, sizes, order."""
    return [(e.name, e.dtype, e.shape, e.end - e.begin) for e in s.entries]


def _ints(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _cut(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:117]}..."
