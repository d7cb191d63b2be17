"""Checksums of snapshot files: CRC-32C in hardware when available, zlib's CRC-32 otherwise.

Each file entry of a manifest records its checksum under the name of its algorithm:
``"crc32c"`` (the Castagnoli polynomial of iSCSI and ext4, which x86 SSE4.2 and ARMv8 compute
in hardware, ~16 GB/s on one core) or ``"crc32"`` (zlib's, ~4 GB/s; every store written before
version 2 of the manifest). New files use CRC-32C when the optional ``crc32c`` package is
installed (``pip install "polyak[torch]"`` brings it) and CRC-32 otherwise, so a store may hold
both; a reader needs the package only to verify CRC-32C files, and says so by name.

Both functions release the GIL on large buffers, so a reading thread verifies while another
computes.

Example:
    >>> Checksum("crc32").update(b"123456789").hex()
    'cbf43926'
    >>> ALGORITHMS
    ('crc32c', 'crc32')
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any

__all__ = ["ALGORITHMS", "Checksum", "available", "file_checksum", "preferred"]

ALGORITHMS = ("crc32c", "crc32")  # manifest field names, preferred first
_CHUNK = 8 << 20

_crc32c: Callable[[Any, int], int] | None
try:  # optional: hardware CRC-32C (LGPL-2.1+, https://github.com/ICRAR/crc32c)
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - exercised by a test that hides the module
    _crc32c = None


def _function(algorithm: str) -> Callable[[Any, int], int]:
    if algorithm == "crc32":
        return zlib.crc32
    if algorithm == "crc32c":
        if _crc32c is None:
            raise ImportError(
                'this store\'s files carry CRC-32C checksums; verifying them needs the "crc32c" '
                'package: pip install "polyak[torch]" (or crc32c)',
                name="crc32c",
            )
        return _crc32c
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {ALGORITHMS}")


def available(algorithm: str) -> bool:
    """Whether ``algorithm`` can be computed here."""
    return algorithm == "crc32" or (algorithm == "crc32c" and _crc32c is not None)


def preferred() -> str:
    """The algorithm new files get: ``"crc32c"`` if the package is installed, else ``"crc32"``."""
    return "crc32c" if _crc32c is not None else "crc32"


class Checksum:
    """A running checksum of bytes fed in order (:meth:`update`), 32 bits.

    Raises:
        ImportError: ``"crc32c"`` without the ``crc32c`` package (the message says what to
            install).
    """

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._f = _function(algorithm)
        self.value = 0

    def update(self, data: Any) -> Checksum:
        """Feed ``data`` (any buffer: bytes, bytearray, memoryview)."""
        self.value = self._f(data, self.value)
        return self

    def hex(self) -> str:
        return f"{self.value:08x}"


def file_checksum(path: str | os.PathLike[str], algorithm: str) -> tuple[int, int]:
    """``(checksum, size)`` of a whole file, read in 8 MiB chunks."""
    check, size = Checksum(algorithm), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            check.update(view[:n])
            size += n
    return check.value, size
