"""The errors of a snapshot store: one named error for every way a store cannot be used.

All are :class:`polyak.CheckpointError` (a ``ValueError``): the store is read back from disk and
treated as untrusted, and each message names the file and the field or tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from polyak.errors import CheckpointError

if TYPE_CHECKING:
    from polyak.posthoc.store import SnapshotFile

__all__ = ["ChecksumError", "ForeignRunError", "StoreError"]


class StoreError(CheckpointError):
    """A store that cannot be used as asked: no manifest, a malformed or unsafe one (a field
    missing, of the wrong type or out of range, a file name that is not the store's own), files
    that do not match it, or a mismatch with the run writing it.

    ``file`` is the manifest's entry of the snapshot file concerned, when there is one (a reader
    of a store that a run is writing re-reads the manifest to tell a file the run replaced or
    deleted from a damaged one).
    """

    def __init__(self, message: str, *, file: SnapshotFile | None = None) -> None:
        super().__init__(message)
        self.file = file


class ForeignRunError(StoreError):
    """The directory holds the store of another training run (another run id)."""


class ChecksumError(StoreError):
    """A snapshot file is missing, or does not match the size or checksum its manifest records.

    Attributes:
        path: the file.
        step: the step of its snapshot.
    """

    def __init__(
        self, path: Path, step: int, detail: str, *, file: SnapshotFile | None = None
    ) -> None:
        self.path, self.step = path, step
        super().__init__(
            f"snapshot file {path} (step {step}) is corrupt: {detail}. Restore the file, or "
            f"reconstruct at an earlier step (step=...) that does not use it",
            file=file,
        )
