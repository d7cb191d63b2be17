"""The manifest of a snapshot store, checked as untrusted input before anything uses it.

A manifest is read back from disk, where anyone may have edited it. :func:`validate` checks it
whole against the schema below before a single field is used: types, ranges, required keys,
the format version, and every file name. A file name must be *exactly* the name the writer
gives that snapshot's file, ``{step:010d}-{key}-{run_id}[-rank{r}].safetensors`` built from the
entry's own step and average key and the manifest's run id and rank: a plain name in the store
(no separator, no ``..``, not absolute), so no manifest can point a reader or the writer at a
file outside the store or at another run's files. Every violation is one :class:`StoreError`
naming the manifest and the field (``snapshots[3].files.sigma0.05.name``).

Schema (version 2; version 1, written by polyak before CRC-32C, is read too: no ``live`` needed,
no ``dtype`` per tensor, a ``crc32`` per file)::

    {"format": "polyak.posthoc", "version": 2,
     "run_id": 16 hex digits, "rank": r, "world_size": n, "sharded": bool,
     "snapshot_dtype": "float16" | "bfloat16" | "float32" | "float64",
     "start_step": int >= 0, "live": bool,
     "averages": {"sigma0.05": {"sigma_rel": 0.05, "gamma": 16.97..., "name": "..."}, ...},
     "tensors": {"0.weight": {"shape": [...], "kind": "average" | "copied", "dtype": "...",
                              "shard": null | {"global_shape", "offset", "local_shape"}}, ...},
     "snapshots": [{"step": s, "t": t,
                    "files": {key: {"name": ..., "bytes": n, "crc32c" | "crc32": "8 hex"}}}]}

with the averages' keys ``sigma{sigma_rel:g}`` and ``gamma`` EDM2's exponent of ``sigma_rel``,
steps strictly increasing, ``t`` (the optimizer steps of averaging behind the snapshot)
non-decreasing and at most ``step - start_step``, every snapshot holding one file per average
(and a ``live`` one when ``live``).

Example:
    >>> file_name(1000, "sigma0.05", "0123456789abcdef", None)
    '0000001000-sigma0.05-0123456789abcdef.safetensors'
    >>> validate({"format": "polyak.posthoc", "version": 2}, "manifest.json")
    Traceback (most recent call last):
    ...
    polyak.posthoc.errors.StoreError: manifest.json: the field 'run_id' is missing
"""

from __future__ import annotations

import math
import os
import re
import uuid
from typing import Any, NoReturn

from polyak._horizon import SIGMA_REL_MAX, sigma_rel_to_gamma
from polyak.posthoc.checksum import ALGORITHMS
from polyak.posthoc.errors import StoreError

__all__ = [
    "FORMAT",
    "LIVE",
    "SUFFIX",
    "VERSION",
    "file_name",
    "manifest_name",
    "new_run_id",
    "validate",
]

FORMAT = "polyak.posthoc"
VERSION = 2  # written; 1 and 2 are read
SUFFIX = ".safetensors"
LIVE = "live"
RUN_ID = re.compile(r"[0-9a-f]{16}")
SNAPSHOT_DTYPES = ("float16", "bfloat16", "float32", "float64")
TENSOR_DTYPES = (*SNAPSHOT_DTYPES, "int64", "int32", "int16", "int8", "uint8", "bool")
MAX_INT = 2**62  # steps, sizes, dimensions: far beyond any run, small enough for every format
MAX_DIMS = 64
_HEX = re.compile(r"[0-9a-f]{8}")


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


class _Checker:
    """The checks of one manifest; every failure names the file and the field."""

    def __init__(self, where: str | os.PathLike[str]) -> None:
        self.where = where

    def fail(self, field: str, message: str) -> NoReturn:
        raise StoreError(
            f"{self.where}: {field} {message}; the manifest is damaged or was edited (restore it "
            "from the run's copy, or use a new directory)"
        )

    def get(self, data: dict[str, Any], key: str, field: str = "") -> Any:
        if key not in data:
            raise StoreError(f"{self.where}: the field {field or repr(key)} is missing")
        return data[key]

    def mapping(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, f"must be an object, got {_short(value)}")
        return value

    def sequence(self, value: Any, field: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(field, f"must be a list, got {_short(value)}")
        return value

    def integer(self, value: Any, field: str, lo: int, hi: int = MAX_INT) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"must be an integer, got {_short(value)}")
        if not lo <= value <= hi:
            self.fail(field, f"must be in [{lo}, {hi}], got {value}")
        return value

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, got {_short(value)}")
        return value

    def real(self, value: Any, field: str, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"must be a number, got {_short(value)}")
        if not (math.isfinite(value) and lo < value < hi):
            self.fail(field, f"must be in ({lo:g}, {hi:g}), got {value!r}")
        return float(value)

    def choice(self, value: Any, field: str, allowed: tuple[Any, ...]) -> Any:
        if isinstance(value, bool) or value not in allowed:
            self.fail(field, f"must be one of {list(allowed)}, got {_short(value)}")
        return value

    def shape(self, value: Any, field: str) -> list[int]:
        dims = self.sequence(value, field)
        if len(dims) > MAX_DIMS:
            self.fail(field, f"has {len(dims)} dimensions, more than {MAX_DIMS}")
        return [self.integer(d, f"{field}[{i}]", 0) for i, d in enumerate(dims)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def validate(data: Any, where: str | os.PathLike[str]) -> dict[str, Any]:
    """``data`` (a parsed manifest) if it follows the schema (module docstring), else an error.

    Checks the manifest alone; what depends on the other ranks' manifests or on the files on
    disk is checked by :func:`polyak.posthoc.store.open_store` and the readers.

    Raises:
        StoreError: naming ``where`` and the first field that is wrong.
    """
    c = _Checker(where)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{where} is not a {FORMAT} manifest (its 'format' is not {FORMAT!r})")
    version = c.get(data, "version")
    if isinstance(version, bool) or version not in (1, VERSION):
        raise StoreError(
            f"{where} has version {_short(version)}; this polyak reads versions 1 and {VERSION} "
            "(a newer polyak wrote it: upgrade polyak)"
        )
    run_id = c.get(data, "run_id")
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        c.fail("run_id", f"must be 16 hexadecimal digits, got {_short(run_id)}")
    sharded = c.boolean(c.get(data, "sharded"), "sharded")
    world = c.integer(c.get(data, "world_size"), "world_size", 1)
    rank = c.integer(c.get(data, "rank"), "rank", 0, world - 1)
    if not sharded and (rank, world) != (0, 1):
        c.fail("rank", f"and world_size must be 0 and 1 in an unsharded store, got {rank}, {world}")
    dtype = c.choice(c.get(data, "snapshot_dtype"), "snapshot_dtype", SNAPSHOT_DTYPES)
    start = c.integer(c.get(data, "start_step"), "start_step", 0)
    live = c.boolean(data.get("live", False) if version == 1 else c.get(data, "live"), "live")
    keys = _averages(c, c.mapping(c.get(data, "averages"), "averages"))
    _tensors(c, c.mapping(c.get(data, "tensors"), "tensors"), version, dtype, sharded)
    expected = {*keys, LIVE} if live else set(keys)
    snaps = c.sequence(c.get(data, "snapshots"), "snapshots")
    last_step, last_t = -1, -start
    for i, snap in enumerate(snaps):
        field = f"snapshots[{i}]"
        snap = c.mapping(snap, field)
        step = c.integer(c.get(snap, "step", f"{field}.step"), f"{field}.step", 0)
        if step <= last_step:
            c.fail(f"{field}.step", f"{step} does not follow the step before it ({last_step})")
        t = c.integer(c.get(snap, "t", f"{field}.t"), f"{field}.t", last_t, step - start)
        last_step, last_t = step, t
        files = c.mapping(c.get(snap, "files", f"{field}.files"), f"{field}.files")
        if set(files) != expected:
            c.fail(f"{field}.files", f"has the files {sorted(files)}, expected {sorted(expected)}")
        for key, entry in files.items():
            own = file_name(step, key, run_id, rank if sharded else None)
            _file(c, c.mapping(entry, f"{field}.files.{key}"), f"{field}.files.{key}", own, version)
    return data


def _averages(c: _Checker, averages: dict[str, Any]) -> list[str]:
    if not averages:
        c.fail("averages", "is empty")
    for key, info in averages.items():
        field = f"averages.{key}"
        info = c.mapping(info, field)
        s = c.real(c.get(info, "sigma_rel", f"{field}.sigma_rel"), f"{field}.sigma_rel", 0.0,
                   SIGMA_REL_MAX)  # fmt: skip
        if key != f"sigma{s:g}":
            c.fail(field, f"is the key of sigma_rel {s!r}, which is stored as 'sigma{s:g}'")
        gamma = c.real(c.get(info, "gamma", f"{field}.gamma"), f"{field}.gamma", -1.0, math.inf)
        if not math.isclose(gamma, sigma_rel_to_gamma(s), rel_tol=1e-9):
            c.fail(f"{field}.gamma", f"{gamma!r} is not the exponent of sigma_rel {s!r}")
        if not isinstance(c.get(info, "name", f"{field}.name"), str):
            c.fail(f"{field}.name", "must be a string")
    return list(averages)


def _tensors(c: _Checker, tensors: dict[str, Any], version: int, dtype: str, sharded: bool) -> None:
    if not tensors:
        c.fail("tensors", "is empty")
    for name, info in tensors.items():
        field = f"tensors[{name!r}]"
        if not name or name == "__metadata__":
            c.fail(field, "is not a tensor name")
        info = c.mapping(info, field)
        shape = c.shape(c.get(info, "shape", f"{field}.shape"), f"{field}.shape")
        kind = c.choice(
            c.get(info, "kind", f"{field}.kind"), f"{field}.kind", ("average", "copied")
        )
        if version > 1:
            own = c.choice(c.get(info, "dtype", f"{field}.dtype"), f"{field}.dtype", TENSOR_DTYPES)
            if kind == "average" and own != dtype:
                c.fail(f"{field}.dtype", f"{own!r} is not the snapshot_dtype {dtype!r}")
        shard = info.get("shard")
        if shard is None:
            continue
        if not sharded:
            c.fail(f"{field}.shard", "must be null in an unsharded store")
        shard = c.mapping(shard, f"{field}.shard")
        parts = {k: c.shape(c.get(shard, k, f"{field}.shard.{k}"), f"{field}.shard.{k}")
                 for k in ("global_shape", "offset", "local_shape")}  # fmt: skip
        if parts["local_shape"] != shape or not all(len(p) == len(shape) for p in parts.values()):
            c.fail(f"{field}.shard", f"does not describe a shard of shape {shape}: {parts}")
        if any(o + n > g for o, n, g in zip(parts["offset"], shape, parts["global_shape"])):
            c.fail(f"{field}.shard", f"reaches beyond the global shape: {parts}")


def _file(c: _Checker, entry: dict[str, Any], field: str, own: str, version: int) -> None:
    name = c.get(entry, "name", f"{field}.name")
    if name != own:
        c.fail(
            f"{field}.name",
            f"{_short(name)} is not the store's own name for this file ({own!r}); a manifest "
            "names only files of its own run in its own directory",
        )
    c.integer(c.get(entry, "bytes", f"{field}.bytes"), f"{field}.bytes", 8)
    algorithms = [a for a in ALGORITHMS if a in entry]
    allowed = ALGORITHMS if version > 1 else ("crc32",)
    if len(algorithms) != 1 or algorithms[0] not in allowed:
        c.fail(field, f"must hold one checksum of {list(allowed)}; it holds {algorithms}")
    value = c.get(entry, algorithms[0], f"{field}.{algorithms[0]}")
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        c.fail(f"{field}.{algorithms[0]}", f"must be 8 hexadecimal digits, got {_short(value)}")


def checksum_of(entry: dict[str, Any]) -> tuple[str, int]:
    """``(algorithm, value)`` of a validated file entry."""
    for algorithm in ALGORITHMS:
        if algorithm in entry:
            return algorithm, int(entry[algorithm], 16)
    raise AssertionError("validated entries hold a checksum")
