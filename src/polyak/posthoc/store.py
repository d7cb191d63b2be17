"""The snapshot store on disk: a manifest per rank, its files, run identity, checked on opening.

A store is a directory holding, per writing rank, one JSON manifest and the safetensors files
it lists. The manifest is the single source of truth: readers use exactly the files it lists
(checked against a size and a checksum each), never a glob, so leftovers of a crash, another
run's files or another library's checkpoints in the same directory are never mixed in. Every
file and every manifest version is published atomically (temporary file in the same directory,
flush, fsync, rename, fsync of the directory): after a crash at any point the store is readable
and holds the snapshots completed before it.

**Everything read back is untrusted.** A manifest is read bounded (:func:`polyak.files.read_json`)
and checked whole against its schema (:mod:`polyak.posthoc.manifest`) before any field is used:
every file name is the store's own name for its snapshot, so nothing outside the directory is
ever named. Across ranks, :func:`open_store` checks that the manifests present are exactly ranks
``0..world_size-1`` of one run with the same settings (so no count comes from a field alone).
Before a file is read, :func:`polyak.posthoc.reading.check_files` opens it and checks that it
is a regular file inside the store (a symlink leaving it, a device or a fifo are refused) of the
size the manifest records; the readers then check its tensors against the manifest and its
checksum (:mod:`polyak.posthoc.reader`). How readers and a live writer coexist is the subject
of :mod:`polyak.posthoc.reading`.

Example:
    >>> import tempfile, torch, polyak
    >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
    >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10)
    >>> for step in range(30):
    ...     ph.update()
    >>> ph.close()
    >>> path, ranks = open_store(store, None)
    >>> [s["step"] for s in ranks[0].manifest["snapshots"]]
    [10, 20, 30]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from polyak import files as _files
from polyak._warn import warn as _warn
from polyak.errors import CheckpointError
from polyak.posthoc.errors import ChecksumError, ForeignRunError, StoreError
from polyak.posthoc.manifest import (
    FORMAT,
    SUFFIX,
    VERSION,
    checksum_of,
    file_name,
    manifest_name,
    new_run_id,
    validate,
)

__all__ = [
    "FORMAT",
    "SUFFIX",
    "VERSION",
    "ChecksumError",
    "ForeignRunError",
    "RankStore",
    "SnapshotFile",
    "StoreError",
    "file_name",
    "find_manifests",
    "manifest_name",
    "new_run_id",
    "open_store",
    "read_manifest",
    "unlisted_files",
]

_MANIFEST_RE = re.compile(r"manifest(?:\.rank(0|[1-9][0-9]{0,8}))?\.json")
MAX_MANIFEST_BYTES = 256 << 20
_SAME = ("snapshot_dtype", "start_step", "live", "averages", "world_size")  # across ranks


def find_manifests(directory: Path) -> dict[int | None, Path]:
    """The manifests in ``directory``: ``{None: path}`` unsharded, else ``{rank: path}``."""
    found: dict[int | None, Path] = {}
    if directory.is_dir():
        for p in directory.iterdir():
            m = _MANIFEST_RE.fullmatch(p.name)
            if m:
                found[None if m.group(1) is None else int(m.group(1))] = p
    if None in found and len(found) > 1:
        raise StoreError(
            f"{directory} holds both an unsharded manifest.json and per-rank manifests "
            f"{sorted(p.name for p in found.values())}; it mixes two stores"
        )
    return found


def read_manifest(path: Path) -> dict[str, Any]:
    """Read one manifest (a regular file in its directory, bounded) and check its schema."""
    try:
        _files.regular_file(path.parent, path.name, what="manifest")
        data = _files.read_json(path, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise StoreError(f"no manifest {path}: not a polyak post-hoc store") from None
    except CheckpointError as e:
        raise StoreError(str(e)) from None
    return validate(data, path)


@dataclass(frozen=True)
class SnapshotFile:
    """One file of a snapshot as its (validated) manifest records it."""

    path: Path
    step: int
    key: str
    size: int
    algorithm: str
    checksum: int
    run_id: str
    manifest: Path  # whose entry this is: re-read to tell a dropped file from a damaged one

    def open(self) -> IO[bytes]:
        """The file opened for reading (a regular file inside the store), or a named error."""
        try:
            return _files.open_regular(self.path.parent, self.path.name, what="snapshot file")
        except FileNotFoundError:
            raise ChecksumError(self.path, self.step, "the file is missing", file=self) from None
        except CheckpointError as e:
            raise StoreError(str(e), file=self) from None


def snapshot_files(
    directory: Path, manifest: dict[str, Any], snap: dict[str, Any], manifest_path: Path
) -> dict[str, SnapshotFile]:
    """``{key: SnapshotFile}`` of one snapshot entry of a validated manifest."""
    out = {}
    for key, e in snap["files"].items():
        algorithm, value = checksum_of(e)
        out[key] = SnapshotFile(
            directory / e["name"], snap["step"], key, e["bytes"], algorithm, value,
            manifest["run_id"], manifest_path,
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class RankStore:
    """One rank's manifest (``rank`` is ``None`` for an unsharded store) and where it is."""

    rank: int | None
    manifest: dict[str, Any]
    path: Path

    def files(self, snap: dict[str, Any]) -> dict[str, SnapshotFile]:
        return snapshot_files(self.path.parent, self.manifest, snap, self.path)


def unlisted_files(directory: Path, ranks: list[RankStore]) -> list[str]:
    """Files in ``directory`` that no manifest lists (leftovers, other runs' or tools' files).

    Temporary files of writes in progress (``.<name>.tmp``) are included.
    """
    listed = {r.path.name for r in ranks}
    for r in ranks:
        listed.update(e["name"] for s in r.manifest["snapshots"] for e in s["files"].values())
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in listed)


def open_store(
    directory: str | os.PathLike[str], rank: int | None, *, warn: bool = True
) -> tuple[Path, list[RankStore]]:
    """The manifests to read (validated): the unsharded one, one rank's, or every rank's.

    With ``warn``, files no manifest lists are named in a ``UserWarning`` (they are ignored),
    except this run's own files of a write in progress.

    Raises:
        StoreError: no manifest, a malformed one, or ranks that do not form one store;
            ``ForeignRunError`` for manifests of different runs. ValueError: a bad ``rank``.
    """
    path = Path(directory)
    found = find_manifests(path)
    if not found:
        raise StoreError(
            f"{path} holds no manifest: not a polyak post-hoc store (PostHocEMA writes one at "
            "its first snapshot)"
        )
    if None in found:
        if rank is not None:
            raise ValueError(f"{path} is an unsharded store; pass rank=None, got rank={rank}")
        ranks = [RankStore(None, read_manifest(found[None]), found[None])]
    else:
        ranks = _ranks(path, {r: p for r, p in found.items() if r is not None})
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise TypeError(f"rank must be an integer >= 0 or None, got {rank!r}")
            if rank >= len(ranks):
                raise ValueError(f"{path} has ranks 0..{len(ranks) - 1}, got rank={rank}")
            ranks = [ranks[rank]]
    if warn:
        run_id = ranks[0].manifest["run_id"]
        unlisted = [
            n
            for n in unlisted_files(path, ranks)
            if not n.endswith(".tmp") and not (n.endswith(SUFFIX) and run_id in n)
        ]
        if unlisted:
            _warn(
                f"{path}: ignoring {len(unlisted)} file(s) no manifest lists (another run's, "
                f"another tool's, or a crash's leftovers): {unlisted[:5]}"
            )
    return path, ranks


def _ranks(path: Path, found: dict[int, Path]) -> list[RankStore]:
    """Every rank's manifest, checked to form one store: ranks ``0..world_size-1`` all present
    (so ``world_size`` is bounded by the files on disk), one run, the same settings."""
    manifests = {r: read_manifest(p) for r, p in sorted(found.items())}
    first = manifests[min(manifests)]
    for r, m in manifests.items():
        if not m["sharded"] or m["rank"] != r:
            raise StoreError(
                f"{found[r]}: a per-rank manifest must be sharded and hold rank {r}, it says "
                f"sharded={m['sharded']}, rank={m['rank']}"
            )
    runs = sorted({m["run_id"] for m in manifests.values()})
    if len(runs) > 1:
        raise ForeignRunError(f"{path}: the ranks' manifests belong to runs {runs}")
    world = first["world_size"]
    if world != len(manifests) or max(manifests) != world - 1:
        present = sorted(manifests)
        raise StoreError(
            f"{path}: the manifests say world_size {world}, but the manifests of ranks {present} "
            "are present; a rank's manifest is missing or another store's was copied in"
        )
    for r, m in manifests.items():
        for key in _SAME:
            if m[key] != first[key]:
                raise StoreError(f"{found[r]}: {key} differs from rank 0's ({m[key]!r})")
        _same_tensors(found[r], m["tensors"], first["tensors"])
    return [RankStore(r, manifests[r], found[r]) for r in range(world)]


def _same_tensors(where: Path, mine: dict[str, Any], first: dict[str, Any]) -> None:
    if list(mine) != list(first):
        raise StoreError(f"{where}: the tensors differ from rank 0's")
    for name, info in mine.items():
        ref = first[name]
        same = info["kind"] == ref["kind"] and info.get("dtype") == ref.get("dtype")
        if info.get("shard") is None or ref.get("shard") is None:
            same = same and info.get("shard") is ref.get("shard") and info["shape"] == ref["shape"]
        else:
            same = same and info["shard"]["global_shape"] == ref["shard"]["global_shape"]
        if not same:
            raise StoreError(f"{where}: tensors[{name!r}] differs from rank 0's ({info})")
