"""Writing snapshots into a store, atomically and in a background thread.

The training thread hands over host copies of the averages (:meth:`SnapshotWriter.submit`) and
goes on; a thread writes one safetensors file per average (temporary file, fsync, checksum,
rename, fsync of the directory) and then publishes a new manifest the same way. A crash or an
error at any stage leaves the previous manifest in force, so readers see exactly the snapshots
completed before it; the error is raised, as :class:`SnapshotWriteError`, by the next
:meth:`~SnapshotWriter.submit`, :meth:`~SnapshotWriter.wait` or :meth:`~SnapshotWriter.close`.

The writer deletes files only after a new manifest that no longer lists them is in place
(snapshots thinned by :class:`Retention`, snapshots replaced by a resumed run, a crash's
leftovers), and only files it wrote itself: each name is checked again at deletion time to be
of this run's and this rank's own pattern, and the path a regular file (not a symlink) in the
store. The manifest it appends to is read through the same checks as any reader's
(:func:`polyak.posthoc.store.read_manifest`). Readers that have the dropped files open keep
reading them; those that meet a deleted one re-read the manifest
(:func:`polyak.posthoc.reading.read_consistent`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polyak import files
from polyak._horizon import integer
from polyak._warn import warn
from polyak.errors import NonFiniteError
from polyak.posthoc import checksum, store
from polyak.posthoc.manifest import FORMAT, LIVE, SUFFIX, VERSION, file_name, manifest_name

__all__ = ["Retention", "SnapshotWriteError", "SnapshotWriter"]


class SnapshotWriteError(RuntimeError):
    """Writing a snapshot failed; the store still holds the snapshots completed before it."""


@dataclass(frozen=True)
class Retention:
    """Which older snapshots to keep (the default, ``None``, keeps all).

    Snapshots more than ``older_than`` steps before the newest one are kept only when their
    step is a multiple of ``every * snapshot_every``: with ``every=4`` the store keeps full
    resolution for recent training and every 4th snapshot before it.

    Examples:
        >>> Retention(every=4, older_than=100_000)
        Retention(every=4, older_than=100000)
    """

    every: int
    older_than: int

    def __post_init__(self) -> None:
        integer("every", self.every, 1)
        integer("older_than", self.older_than, 0)

    def victims(self, steps: list[int], snapshot_every: int) -> list[int]:
        """The steps to delete among ``steps`` (the newest is ``max(steps)``)."""
        newest, period = max(steps), self.every * snapshot_every
        return [s for s in steps if newest - s > self.older_than and s % period]


def _save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=metadata)


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    files.fsync_dir(final.parent)


def _remove(paths: list[Path], own: re.Pattern[str]) -> None:
    """Delete ``paths``, each checked now to be the writer's own: a name of ``own`` and a
    regular file (``lstat``: a symlink is not followed, nor deleted)."""
    for p in paths:
        if not own.fullmatch(p.name):
            raise store.StoreError(f"refusing to delete {p}: not a file of this run's store")
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            raise store.StoreError(f"refusing to delete {p}: not a regular file")
        p.unlink(missing_ok=True)


_SETTINGS = ("world_size", "sharded", "snapshot_dtype", "start_step", "live", "averages", "tensors")


def _names(manifest: dict[str, Any]) -> set[str]:
    return {e["name"] for s in manifest["snapshots"] for e in s["files"].values()}


def _check_finite(tensors: Mapping[str, torch.Tensor], key: str, step: int) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            hint = ""
            if t.dtype == torch.float16:
                hint = (
                    " (float16 holds |x| <= 65504: weights this large need "
                    "snapshot_dtype=torch.float32 or torch.bfloat16)"
                )
            raise NonFiniteError(
                f"{name} of average {key!r} at step {step} is not finite in {t.dtype}{hint}; "
                "the snapshot was not written",
                [name],
            )


class SnapshotWriter:
    """One rank's writer into a store (see the module docstring).

    Args:
        directory: the store (created if missing).
        header: the manifest fields fixed for the run (``run_id``, ``rank``, ``world_size``,
            ``sharded``, ``snapshot_dtype``, ``start_step``, ``averages``, ``tensors``).
        snapshot_every: the snapshot period (for ``retention``).
        retention: which older snapshots to delete, or ``None`` to keep all.
    """

    def __init__(
        self,
        directory: Path,
        header: dict[str, Any],
        snapshot_every: int,
        retention: Retention | None,
    ) -> None:
        self.directory = directory
        self.header = header
        self.rank: int | None = header["rank"] if header["sharded"] else None
        self.path = directory / manifest_name(self.rank)
        keys = "|".join(re.escape(k) for k in [*header["averages"], LIVE])
        rank_part = "" if self.rank is None else f"-rank{self.rank}"
        name = (
            rf"[0-9]{{10,}}-(?:{keys})-{re.escape(header['run_id'])}{rank_part}{re.escape(SUFFIX)}"
        )
        # this run's and this rank's snapshot files, and their temporary files
        self._own = re.compile(rf"{name}|\.{name}\.[0-9a-f]{{8}}\.tmp")
        self.snapshot_every = snapshot_every
        self.retention = retention
        self._manifest: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._error: tuple[int, BaseException] | None = None

    # ------------------------------------------------------------------ caller's side
    def submit(self, step: int, t: int, payload: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write the snapshot of ``step`` in the background.

        ``payload`` is ``{average key: {tensor name: host tensor}}``; the tensors must not
        change until the write is over (:meth:`wait`).
        """
        self.wait()
        if self._manifest is None:
            self._manifest = self._open()
        later = [s["step"] for s in self._manifest["snapshots"] if s["step"] >= step]
        if later:
            warn(
                f"{self.path}: replacing the snapshots at steps {later}, which were written "
                f"after the state this run resumed from (now at step {step})"
            )
        self._thread = threading.Thread(
            target=self._run, args=(step, t, payload), name=f"polyak-snapshot-{step}"
        )
        self._thread.start()

    def wait(self) -> None:
        """Wait for the write in progress; raise :class:`SnapshotWriteError` if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            step, error = self._error
            self._error = None
            kept = self._manifest is not None and any(
                s["step"] == step for s in self._manifest["snapshots"]
            )
            state = (
                "the snapshot is in the store; a later stage failed"
                if kept
                else "the store holds the snapshots before it"
            )
            raise SnapshotWriteError(
                f"writing the snapshot of step {step} to {self.directory} failed "
                f"({type(error).__name__}: {error}); {state}"
            ) from error

    close = wait

    def _open(self) -> dict[str, Any]:
        """The manifest to append to: this run's own, or a new one (checked synchronously)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        run_id = self.header["run_id"]
        found = store.find_manifests(self.directory)
        for path in found.values():
            other = store.read_manifest(path)
            if other["run_id"] != run_id:
                raise store.ForeignRunError(
                    f"{self.directory} holds the snapshots of another run ({other['run_id']}; "
                    f"this run is {run_id}): use a new directory, or resume that run "
                    "(load_state_dict with its state) to append to its store"
                )
        if self.path not in found.values():
            self._remove_own_leftovers(set())
            return {"format": FORMAT, "version": VERSION, **self.header, "snapshots": []}
        manifest = store.read_manifest(self.path)
        v1 = manifest["version"] == 1  # no dtypes of tensors: compared without them
        for key in ("rank", *_SETTINGS):
            ours = self.header[key]
            if key == "tensors" and v1:
                ours = {n: {k: v for k, v in i.items() if k != "dtype"} for n, i in ours.items()}
            if manifest.get(key, False) != ours:
                raise store.StoreError(
                    f"{self.path}: this run's {key} is {self.header[key]!r} but its store was "
                    f"written with {manifest.get(key)!r}; keep the settings of the run or use a "
                    "new directory"
                )
        manifest.update(version=VERSION, live=self.header["live"], tensors=self.header["tensors"])
        self._remove_own_leftovers(_names(manifest))
        return manifest

    def _remove_own_leftovers(self, listed: set[str]) -> None:
        """Delete files this run (and rank) wrote but never listed: a crash's leftovers."""
        leftovers = [
            p
            for p in self.directory.iterdir()
            if p.name not in listed and self._own.fullmatch(p.name)
        ]
        _remove(leftovers, self._own)

    # ------------------------------------------------------------------ writer thread
    def _run(self, step: int, t: int, payload: dict[str, dict[str, torch.Tensor]]) -> None:
        try:
            self._write(step, t, payload)
        except BaseException as e:  # reported by the next submit/wait/close
            self._error = (step, e)

    def _commit(self, manifest: dict[str, Any]) -> None:
        """Publish ``manifest``, then delete the files the old one listed and it does not."""
        assert self._manifest is not None
        dropped = _names(self._manifest) - _names(manifest)
        files.write_json_atomic(self.path, manifest)
        self._manifest = manifest
        _remove([self.directory / n for n in sorted(dropped)], self._own)

    def _write(self, step: int, t: int, payload: dict[str, dict[str, torch.Tensor]]) -> None:
        assert self._manifest is not None
        if any(s["step"] >= step for s in self._manifest["snapshots"]):
            kept = copy.deepcopy(self._manifest)
            kept["snapshots"] = [s for s in kept["snapshots"] if s["step"] < step]
            self._commit(kept)  # first drop them, so that no listed file is ever overwritten
        written: dict[str, dict[str, Any]] = {}
        published: list[Path] = []
        tmp: Path | None = None
        try:
            for key, tensors in payload.items():
                _check_finite(tensors, key, step)
                name = file_name(step, key, self.header["run_id"], self.rank)
                tmp = files.temp_path(self.directory / name)
                metadata = {"format": FORMAT, "run_id": self.header["run_id"]}
                metadata.update(step=str(step), t=str(t), average=key)
                _save(tensors, tmp, metadata)
                files.fsync_file(tmp)
                algorithm = checksum.preferred()
                value, size = checksum.file_checksum(tmp, algorithm)
                published.append(self.directory / name)  # before: the rename may be done
                _publish(tmp, self.directory / name)
                tmp = None
                written[key] = {"name": name, "bytes": size, algorithm: f"{value:08x}"}
            manifest = copy.deepcopy(self._manifest)
            manifest["snapshots"].append({"step": step, "t": t, "files": written})
            if self.retention is not None:
                doomed = set(
                    self.retention.victims(
                        [s["step"] for s in manifest["snapshots"]], self.snapshot_every
                    )
                )
                manifest["snapshots"] = [
                    s for s in manifest["snapshots"] if s["step"] not in doomed
                ]
            self._commit(manifest)
        except BaseException:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            self._resync()
            assert self._manifest is not None
            if not any(s["step"] == step for s in self._manifest["snapshots"]):
                _remove(published, self._own)  # published but never listed: not in the store
            raise

    def _resync(self) -> None:
        """After a failure: the manifest in force is the one on disk (if it got renamed into
        place before the failure, the snapshot is part of the store)."""
        with contextlib.suppress(store.StoreError):  # none yet: keep the last one we wrote
            self._manifest = store.read_manifest(self.path)
