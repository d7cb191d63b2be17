"""The snapshot store on disk: a manifest per rank, its files, run identity, checksums.

A store is a directory holding, per writing rank, one JSON manifest and the safetensors files
it lists. The manifest is the single source of truth: readers use exactly the files it lists
(checked against a CRC-32 and a size each), never a glob, so leftovers of a crash, another
run's files or another library's checkpoints in the same directory are never mixed in. Every
file and every manifest version is published atomically (temporary file in the same directory,
flush, fsync, rename, fsync of the directory): after a crash at any point the store is readable
and holds the snapshots completed before it.

Manifest (``"format": "polyak.posthoc"``, ``"version": 1``)::

    {"run_id": "...", "rank": 0, "world_size": 1, "sharded": false, "snapshot_dtype": "float16",
     "start_step": 0, "live": false,
     "averages": {"sigma0.05": {"sigma_rel": 0.05, "gamma": 16.97, "name": "power(...)"}, ...},
     "tensors": {"0.weight": {"shape": [...], "kind": "average" | "copied", "shard": null}, ...},
     "snapshots": [{"step": 1000, "t": 1000,
                    "files": {"sigma0.05": {"name": "...", "bytes": 123, "crc32": "89abcdef"}}}]}

``t`` is the time the averages' profiles end at (optimizer steps since averaging started, at the
last update before the snapshot); a ``"live"`` file, when kept, holds the live weights.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyak._horizon import integer

__all__ = [
    "FORMAT",
    "VERSION",
    "ChecksumError",
    "ForeignRunError",
    "RankStore",
    "StoreError",
    "crc32_file",
    "file_name",
    "find_manifests",
    "fsync_dir",
    "manifest_name",
    "open_store",
    "read_manifest",
    "unlisted_files",
    "write_json_atomic",
]

FORMAT = "polyak.posthoc"
VERSION = 1
SUFFIX = ".safetensors"
_MANIFEST_RE = re.compile(r"^manifest(?:\.rank(\d+))?\.json$")
_CHUNK = 8 << 20


class StoreError(ValueError):
    """A store that cannot be used as asked: no manifest, a malformed one, or a mismatch."""


class ForeignRunError(StoreError):
    """The directory holds the store of another training run (another run id)."""


class ChecksumError(StoreError):
    """A snapshot file does not match the size or CRC-32 its manifest records."""

    def __init__(self, path: Path, step: int, detail: str) -> None:
        self.path, self.step = path, step
        super().__init__(
            f"snapshot file {path} (step {step}) is corrupt: {detail}. Restore the file, or "
            f"reconstruct at an earlier step (step=...) that does not use it"
        )


def manifest_name(rank: int | None) -> str:
    """``manifest.json`` for an unsharded store, ``manifest.rank{r}.json`` per rank otherwise."""
    return "manifest.json" if rank is None else f"manifest.rank{rank}.json"


def file_name(step: int, key: str, run_id: str, rank: int | None) -> str:
    """Snapshot file name: the step first (``ls`` sorts by it), then average, run and rank."""
    rank_part = "" if rank is None else f"-rank{rank}"
    return f"{step:010d}-{key}-{run_id}{rank_part}{SUFFIX}"


def new_run_id() -> str:
    """A random run identity (16 hex digits)."""
    return uuid.uuid4().hex[:16]


def fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, flush, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def crc32_file(path: Path) -> tuple[int, int]:
    """``(crc32, size)`` of a file, read in 8 MiB chunks."""
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return crc, size


def find_manifests(directory: Path) -> dict[int | None, Path]:
    """The manifests in ``directory``: ``{None: path}`` unsharded, else ``{rank: path}``."""
    found: dict[int | None, Path] = {}
    if directory.is_dir():
        for p in directory.iterdir():
            m = _MANIFEST_RE.match(p.name)
            if m:
                found[None if m.group(1) is None else int(m.group(1))] = p
    if None in found and len(found) > 1:
        raise StoreError(
            f"{directory} holds both an unsharded manifest.json and per-rank manifests "
            f"{sorted(p.name for p in found.values())}; it mixes two stores"
        )
    return found


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check one manifest (format, version and the fields readers rely on)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"no manifest {path}: not a polyak post-hoc store") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path} is not a {FORMAT} manifest")
    if data.get("version") != VERSION:
        raise StoreError(
            f"{path} has version {data.get('version')!r}; this polyak reads version {VERSION}"
        )
    for key in ("run_id", "snapshot_dtype", "averages", "tensors", "snapshots", "start_step"):
        if key not in data:
            raise StoreError(f"{path} lacks the field {key!r}")
    return data


def listed_names(manifest: dict[str, Any]) -> Iterator[str]:
    """Every file name a manifest lists."""
    for snap in manifest["snapshots"]:
        for entry in snap["files"].values():
            yield entry["name"]


def unlisted_files(directory: Path, manifests: dict[int | None, Path]) -> list[str]:
    """Files in ``directory`` that no manifest lists (leftovers, other runs' or tools' files).

    Temporary files of writes in progress (``.<name>.tmp``) are included.
    """
    listed = {p.name for p in manifests.values()}
    for path in manifests.values():
        listed.update(listed_names(read_manifest(path)))
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in listed)


@dataclass(frozen=True)
class SnapshotFile:
    """One file of a snapshot as the manifest records it."""

    path: Path
    step: int
    key: str
    size: int
    crc32: int


def snapshot_files(directory: Path, manifest: dict[str, Any], snap: dict[str, Any]) -> dict:
    """``{key: SnapshotFile}`` of one manifest snapshot entry."""
    return {
        key: SnapshotFile(
            directory / e["name"], int(snap["step"]), key, int(e["bytes"]), int(e["crc32"], 16)
        )
        for key, e in snap["files"].items()
    }


def verify(file: SnapshotFile) -> None:
    """Check one file's size and CRC-32 against the manifest (reads the whole file)."""
    try:
        crc, size = crc32_file(file.path)
    except FileNotFoundError:
        raise ChecksumError(file.path, file.step, "the file is missing") from None
    check(file, crc, size)


def check(file: SnapshotFile, crc: int, size: int) -> None:
    """Raise :class:`ChecksumError` unless ``crc``/``size`` are what the manifest records."""
    if size != file.size:
        raise ChecksumError(file.path, file.step, f"{size} bytes, the manifest says {file.size}")
    if crc != file.crc32:
        raise ChecksumError(
            file.path, file.step, f"CRC-32 {crc:08x}, the manifest says {file.crc32:08x}"
        )


@dataclass(frozen=True)
class RankStore:
    """One rank's manifest (``rank`` is ``None`` for an unsharded store)."""

    rank: int | None
    manifest: dict[str, Any]


def open_store(
    directory: str | Path, rank: int | None, *, warn: bool = True
) -> tuple[Path, list[RankStore]]:
    """The manifests to read: the unsharded one, one rank's, or every rank's (checked).

    With ``warn``, files no manifest lists are named in a ``UserWarning`` (they are ignored).
    """
    path = Path(directory)
    found = find_manifests(path)
    if not found:
        raise StoreError(
            f"{path} holds no manifest: not a polyak post-hoc store (PostHocEMA writes one at "
            "its first snapshot)"
        )
    unlisted = [n for n in unlisted_files(path, found) if not n.endswith(".tmp")]
    if unlisted and warn:
        warnings.warn(
            f"{path}: ignoring {len(unlisted)} file(s) no manifest lists (another run's, "
            f"another tool's, or a crash's leftovers): {unlisted[:5]}",
            UserWarning,
            stacklevel=3,
        )
    if None in found:
        if rank is not None:
            raise ValueError(f"{path} is an unsharded store; pass rank=None, got rank={rank}")
        return path, [RankStore(None, read_manifest(found[None]))]
    ranks = {r: read_manifest(p) for r, p in found.items() if r is not None}
    world = ranks[min(ranks)]["world_size"]
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        raise StoreError(f"{path}: the manifests of ranks {missing} (of {world}) are missing")
    runs = {m["run_id"] for m in ranks.values()}
    if len(runs) > 1:
        raise ForeignRunError(f"{path}: the ranks' manifests belong to runs {sorted(runs)}")
    if rank is not None:
        integer("rank", rank, 0)
        if rank not in ranks:
            raise ValueError(f"{path} has ranks 0..{world - 1}, got rank={rank}")
        return path, [RankStore(rank, ranks[rank])]
    return path, [RankStore(r, ranks[r]) for r in range(world)]
