"""The checks every polyak state dict starts with (pure core: imports nothing)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_header"]


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
