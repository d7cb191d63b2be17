"""The Lightning callback's entry in a checkpoint (``checkpoint["callbacks"][state_key]``),
written with the step it belongs to and checked as untrusted input when read back.

The entry::

    {"format": "polyak EMACallback", "version": 1, "global_step": 6,
     "ema": <EMA.state_dict()>, "live_state_dict": <the live weights, with
     save_average_as_weights>}

``global_step`` is the trainer's global step when the state was taken, so a resumed entry must
equal the checkpoint's own ``global_step``: an entry grafted from another checkpoint is refused.
:func:`check_entry` checks the schema (types, required and unknown keys, format version) before
anything is used; the EMA state itself is checked by ``EMA.load_state_dict``
(:func:`polyak.integrations._common.load_checked`). Every violation is one
:class:`polyak.CheckpointError` naming the checkpoint and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from polyak.errors import CheckpointError

__all__ = [
    "FORMAT",
    "MARKER",
    "VERSION",
    "check_entry",
    "checkpoint_step",
    "fill_from_state_dict",
    "make_entry",
]

FORMAT, VERSION = "polyak EMACallback", 1
MARKER = "polyak_state_dict"  # top-level key of a checkpoint whose state_dict is an average
_REQUIRED = ("format", "version", "global_step", "ema")
_OPTIONAL = ("live_state_dict", "in_state_dict")
_TENSOR_TABLES = ("averages", "copied", "shards")  # checked by EMA.load_state_dict


def _equal(value: Any, expected: str | int) -> bool:
    """``value == expected`` for a value of any type (a tensor compared is not a bool)."""
    return type(value) is type(expected) and value == expected


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain data (what JSON holds): no tensor, no other object."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > 100_000:  # a schedule's state is a few fields
            return False
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return False
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif item is not None and not isinstance(item, (str, int, float)):
            return False
    return True


def make_entry(ema_state: Mapping[str, Any], global_step: int) -> dict[str, Any]:
    """The entry for ``ema_state`` (``EMA.state_dict()``) taken at ``global_step``."""
    return {"format": FORMAT, "version": VERSION, "global_step": global_step, "ema": ema_state}


def _step(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: {field} must be an int >= 0, got {value!r:.80}")
    return value


def checkpoint_step(checkpoint: Mapping[str, Any], where: str) -> int:
    """The checkpoint's own ``global_step`` (Lightning writes it), checked."""
    if "global_step" not in checkpoint:
        raise CheckpointError(
            f"{where}: the checkpoint has no 'global_step'; it is not a Lightning checkpoint"
        )
    return _step(checkpoint["global_step"], where, "the checkpoint's 'global_step'")


def check_entry(entry: Any, where: str, global_step: int | None) -> Mapping[str, Any]:
    """``entry`` if it has the schema :func:`make_entry` writes and, when ``global_step`` is
    given, was taken at that step.

    Args:
        where: the checkpoint and the entry's key, for messages.
        global_step: the checkpoint's ``global_step`` (``None``: not known, not compared).

    Raises:
        CheckpointError: naming ``where`` and the field, and saying what to do.
    """
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"{where}: expected a dict, got {type(entry).__name__}")
    if not (_equal(entry.get("format"), FORMAT) and _equal(entry.get("version"), VERSION)):
        raise CheckpointError(
            f"{where}: not a {FORMAT!r} entry of version {VERSION} ('format' and 'version' are "
            f"{entry.get('format')!r:.60} and {entry.get('version')!r:.20}): it was written by an "
            "earlier polyak or another program. Resume it with the polyak that wrote it, or "
            "without this callback's entry (the average then starts anew from the weights)"
        )
    missing = [k for k in _REQUIRED if k not in entry]
    unknown = sorted(str(k) for k in entry if k not in (*_REQUIRED, *_OPTIONAL))
    if missing or unknown:
        raise CheckpointError(
            f"{where}: the fields {missing} are missing and {str(unknown)[:200]} unknown"
        )
    saved = _step(entry["global_step"], where, "'global_step'")
    if global_step is not None and saved != global_step:
        raise CheckpointError(
            f"{where}: the EMA state was taken at global step {saved}, but the checkpoint is at "
            f"global step {global_step}: the callback's entry comes from another checkpoint. "
            "Resume from the checkpoint it was saved in, or put back this checkpoint's own entry"
        )
    ema = entry["ema"]
    if not isinstance(ema, Mapping):
        raise CheckpointError(f"{where}: 'ema' must be a dict, got {ema!r:.80}")
    for key, value in ema.items():
        if key not in _TENSOR_TABLES and not _plain(value):
            raise CheckpointError(
                f"{where}: 'ema.{key}' must be plain Python data (dicts, lists, strings, "
                f"numbers), got {value!r:.80}; put back the checkpoint's own entry"
            )
    live = entry.get("live_state_dict", {})
    if not (
        isinstance(live, Mapping)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in live.items())
    ):
        raise CheckpointError(
            f"{where}: 'live_state_dict' must map tensor names to tensors, got {live!r:.80}"
        )
    shared = entry.get("in_state_dict", {"average": "", "names": []})
    if not (
        isinstance(shared, Mapping)
        and set(shared) == {"average", "names"}
        and isinstance(shared["average"], str)
        and isinstance(shared["names"], list)
        and all(isinstance(n, str) for n in shared["names"])
    ):
        raise CheckpointError(
            f"{where}: 'in_state_dict' must be {{'average': <name>, 'names': [<tensor names>]}}, "
            f"got {shared!r:.80}; put back the checkpoint's own entry"
        )
    return entry


def fill_from_state_dict(entry: Any, state_dict: Any, where: str) -> None:
    """Put back into ``entry["ema"]`` the tensors of the average that ``save_average_as_weights``
    kept only in the checkpoint's ``state_dict`` (``entry["in_state_dict"]`` names them), and
    drop that field. ``entry`` was checked by :func:`check_entry`."""
    shared = entry.pop("in_state_dict", None)
    if shared is None:
        return
    name, names = shared["average"], shared["names"]
    table = (
        entry["ema"].get("averages", {}).get(name) if isinstance(entry["ema"], Mapping) else None
    )
    missing = [n for n in names if not isinstance(state_dict, Mapping) or n not in state_dict]
    if not isinstance(table, dict) or missing:
        raise CheckpointError(
            f"{where}: the average {name!r} is kept in the checkpoint's 'state_dict', which lacks "
            f"{missing[:5]} (or the entry has no such average): resume from the checkpoint as "
            "saved, with its own state_dict"
        )
    for n in names:
        value = state_dict[n]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: state_dict[{n!r}] is not a tensor")
        table[n] = value
