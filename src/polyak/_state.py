"""The checks every polyak state dict starts with (pure core: imports nothing)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_header", "skipped_updates"]


def check_header(state: Any, fmt: str, version: int, fields: Iterable[str]) -> Mapping[str, Any]:
    """``state`` as a mapping, after checking its format, version and required fields.

    Raises:
        TypeError: ``state`` is not a mapping.
        ValueError: another format or version, or a required field is missing (named).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"a state dict must be a mapping, got {type(state).__name__}")
    if state.get("format") != fmt or state.get("version") != version:
        raise ValueError(
            f"not a {fmt} v{version} state dict (format={state.get('format')!r}, "
            f"version={state.get('version')!r})"
        )
    for key in fields:
        if key not in state:
            raise ValueError(f"the state dict has no {key!r} field; it is not a whole checkpoint")
    return state


def skipped_updates(state: Mapping[str, Any], num_updates: int) -> int:
    """The state dict's ``skipped_updates`` (0 when absent: saved before the field existed).

    Raises:
        ValueError: not an integer from 0 to ``num_updates`` (the updates it is part of).
    """
    skipped = state.get("skipped_updates", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or not 0 <= skipped <= num_updates:
        raise ValueError(
            f"skipped_updates must be an integer from 0 to num_updates ({num_updates}), got "
            f"{skipped!r:.80}"
        )
    return skipped
