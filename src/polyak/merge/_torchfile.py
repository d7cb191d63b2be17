"""Checkpoints saved with ``torch.save``, read with ``torch.load(weights_only=True, mmap=True)``.

``weights_only=True`` unpickles tensors and plain Python data only, so no code in the file runs;
``mmap=True`` maps the tensors instead of reading them, so opening a checkpoint costs its
header, and a merge reads each tensor when it needs it (files of the old, non-zip format are
read whole). What the file holds decides the kind: a polyak ``EMA.state_dict()`` (``format``
``"polyak.EMA"``: one average, by name), a Lightning checkpoint (``state_dict`` and
``global_step``), or a plain ``{name: tensor}`` state dict.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from polyak import files
from polyak.errors import CheckpointError
from polyak.merge._source import Source, check_tensor

__all__ = ["open_file", "sharded"]


def _load(path: Path) -> Any:
    try:
        files.regular_file(path.parent, path.name, what="checkpoint")
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True): {first}. polyak loads "
            "tensors and plain data only (no pickled objects); save a state dict of tensors"
        ) from None


def _tensors(table: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(table, dict) or not table:
        raise CheckpointError(f"{where} holds no {{name: tensor}} state dict")
    out = {}
    for key, value in table.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: tensor names must be strings, got {key!r:.60}")
        out[key] = check_tensor(value, key, where)
    return out


def _step(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: '{field}' must be an integer >= 0, got {value!r:.40}")
    return value


def _ema(state: dict[str, Any], selector: str | None, where: str) -> tuple[dict[str, Any], int]:
    """One average of a polyak ``EMA.state_dict()`` (and its copied tensors), and its step."""
    if state.get("shards"):
        raise CheckpointError(
            f"{where} holds this rank's shards of a sharded (FSDP2) EMA; save "
            "ema.state_dict(full=True) for a merge"
        )
    averages, copied = state.get("averages"), state.get("copied", {})
    if not isinstance(averages, dict) or not averages or not isinstance(copied, dict):
        raise CheckpointError(f"{where}: 'averages' must map average names to state dicts")
    if selector is None:
        if len(averages) > 1:
            raise ValueError(
                f"{where} keeps {len(averages)} averages {sorted(averages)}; choose one: "
                f"{where}::NAME"
            )
        selector = next(iter(averages))
    if selector not in averages:
        raise ValueError(f"{where} keeps no average {selector!r}; its averages: {sorted(averages)}")
    timeline = state.get("timeline")
    step = _step(timeline.get("step") if isinstance(timeline, dict) else None, where,
                 "timeline.step")  # fmt: skip
    table = averages[selector]
    if not isinstance(table, dict):
        raise CheckpointError(f"{where}: averages[{selector!r}] is not a state dict")
    return {**table, **copied}, step


def _interpret(
    obj: Any, selector: str | None, where: str
) -> tuple[dict[str, Any], str, int | None]:
    if isinstance(obj, dict) and obj.get("format") == "polyak.EMA":
        table, at = _ema(obj, selector, where)
        return table, "ema", at
    if selector is not None:
        raise ValueError(f"{where}::{selector}: only a polyak EMA state file takes a selector")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        saved = obj.get("global_step")
        return (
            obj["state_dict"],
            "lightning",
            None if saved is None else _step(saved, where, "global_step"),
        )
    return obj, "torch", None


def _source(
    name: str, kind: str, step: int | None, tables: list[tuple[Path, dict[str, torch.Tensor]]]
) -> Source:
    tensors = {n: t for _, table in tables for n, t in table.items()}

    def read(tensor: str, begin: int, end: int, buffer: bytearray) -> torch.Tensor:
        return tensors[tensor].reshape(-1)[begin:end]

    shapes = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    return Source(name, kind, step, shapes, read, [p.resolve() for p, _ in tables], tensors.clear)


def open_file(
    path: Path, selector: str | None, name: str, kind: str | None, step: int | None
) -> Source:
    """One ``torch.save`` file as a :class:`~polyak.merge.sources.Source`."""
    where = f"{path}"
    table, found_kind, found_step = _interpret(_load(path), selector, where)
    label = name if selector is None else f"{name}::{selector}"
    return _source(label, kind or found_kind, found_step if step is None else step,
                   [(path, _tensors(table, where))])  # fmt: skip


def sharded(folder: Path, wmap: dict[str, str], name: str, step: int | None) -> Source:
    """A Hugging Face folder of ``pytorch_model-*.bin`` shards listed by its index."""
    tables = []
    for shard in dict.fromkeys(wmap.values()):
        where = str(folder / shard)
        table = _tensors(_interpret(_load(folder / shard), None, where)[0], where)
        wanted = {t for t, s in wmap.items() if s == shard}
        missing = sorted(wanted - set(table))
        if missing:
            raise CheckpointError(
                f"{where} lacks tensor {missing[0]!r}, which pytorch_model.bin.index.json "
                "places there"
            )
        tables.append((folder / shard, {n: t for n, t in table.items() if n in wanted}))
    return _source(name, "hf", step, tables)
