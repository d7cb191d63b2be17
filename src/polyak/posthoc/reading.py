"""Reading a store's files while a run may be writing it: held open, checked, retried.

A run keeps writing its store while others read it: it appends snapshots and, with ``Retention``
or when resumed, drops snapshots from the manifest and then deletes their files (a resumed run
may write a new file under a dropped one's name). Files are never changed in place, and a file a
reader has open stays readable after its deletion. So a reader can only meet a file that
disappeared or changed *since it read the manifest*; then the manifest no longer lists that file
as the reader saw it. :func:`read_consistent` runs a read on the manifests it loaded and, when
the read fails on a file, re-reads that file's manifest: if it still lists the file unchanged,
the failure is real (a damaged file, named); otherwise the store moved on and the read starts
again on the new manifests (a few times at most, then a :class:`StoreError` that says so). Every
file of a reconstruction is opened right after the manifest is read and held open until the end
(:class:`Pins`), so a retry is needed only when a snapshot is dropped in that instant (a few
milliseconds); a reader never reports a false "corrupt".

Example:
    >>> import tempfile, torch, polyak
    >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
    >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10)
    >>> for step in range(30):
    ...     ph.update()
    >>> ph.close()
    >>> def sizes(path, ranks):
    ...     files = [f for s in ranks[0].manifest["snapshots"] for f in ranks[0].files(s).values()]
    ...     with check_files(files):  # open, checked, held until the end of the block
    ...         return len(files)
    >>> read_consistent(store, None, sizes)
    6
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TypeVar

from polyak.posthoc import checksum
from polyak.posthoc.errors import ChecksumError, StoreError
from polyak.posthoc.manifest import checksum_of
from polyak.posthoc.store import RankStore, SnapshotFile, open_store, read_manifest

__all__ = ["PIN_BUDGET", "RETRIES", "Pins", "check_files", "read_consistent"]

RETRIES = 10  # re-reads of a store that moved on under a reader before giving up
PIN_BUDGET = 1024  # files held open at once by a reader (more are opened when read)
T = TypeVar("T")


class Pins:
    """Snapshot files held open from the moment they were checked until the read is over.

    A file a writer deletes stays readable through a descriptor opened before (POSIX), so a
    reader that opens every file right after reading the manifest reads exactly the files that
    manifest listed, however long the read takes. :meth:`open` gives a reader its own handle on
    a held file (or opens one by name beyond :data:`PIN_BUDGET` files).
    """

    def __init__(self) -> None:
        self._held: dict[Path, IO[bytes]] = {}

    def hold(self, file: SnapshotFile, handle: IO[bytes]) -> None:
        if len(self._held) < PIN_BUDGET and file.path not in self._held:
            self._held[file.path] = handle
        else:
            handle.close()

    def open(self, file: SnapshotFile) -> IO[bytes]:
        """A handle on ``file`` positioned at its start (the held one, duplicated)."""
        held = self._held.get(file.path)
        if held is None:
            return file.open()
        handle = os.fdopen(os.dup(held.fileno()), "rb", buffering=0)
        handle.seek(0)  # a duplicate shares the offset with the held one: start over
        return handle

    def close(self) -> None:
        for handle in self._held.values():
            handle.close()
        self._held.clear()

    def __enter__(self) -> Pins:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_files(used: Iterable[SnapshotFile]) -> Pins:
    """Before reading: open each file (a regular file inside the store, checked on the open
    descriptor), check its size against the manifest and that its checksum can be computed
    here. All are checked before any byte is read; the files stay open (:class:`Pins`, use it
    as a context manager) so that a writer deleting one meanwhile does not disturb the read."""
    pins = Pins()
    try:
        for f in used:
            handle = f.open()
            size = os.fstat(handle.fileno()).st_size
            pins.hold(f, handle)
            if size != f.size:
                raise ChecksumError(
                    f.path, f.step, f"{size} bytes, the manifest says {f.size}", file=f
                )
            checksum.Checksum(f.algorithm)  # ImportError naming the package, if it is missing
    except BaseException:
        pins.close()
        raise
    return pins


def _still_listed(file: SnapshotFile) -> bool:
    """Whether ``file``'s manifest, read again now, still lists it as it did."""
    try:
        manifest = read_manifest(file.manifest)
    except StoreError:
        return False
    for snap in manifest["snapshots"]:
        entry = snap["files"].get(file.key) if snap["step"] == file.step else None
        if entry is not None:
            return (
                entry["name"] == file.path.name
                and entry["bytes"] == file.size
                and (checksum_of(entry) == (file.algorithm, file.checksum))
            )
    return False


def read_consistent(
    directory: str | os.PathLike[str],
    rank: int | None,
    read: Callable[[Path, list[RankStore]], T],
    *,
    warn: bool = True,
) -> T:
    """``read(path, ranks)`` on the store's manifests, again on new ones if the store moved on.

    See the module docstring: a failure on a file that the manifest no longer lists as it did
    (a writer dropped or replaced it meanwhile) restarts the read on the manifests now in force.
    """
    for attempt in range(RETRIES):
        path, ranks = open_store(directory, rank, warn=warn and attempt == 0)
        try:
            return read(path, ranks)
        except StoreError as e:
            if e.file is None or _still_listed(e.file):
                raise
            last = e
    raise StoreError(
        f"{directory}: a run writing the store dropped or replaced the snapshots being read "
        f"{RETRIES} times in a row ({last}); read it again, or when the run is over"
    ) from last
