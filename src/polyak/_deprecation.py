"""Deprecated names: each warns once per call site for one release, then goes (pure core)."""

from __future__ import annotations

import warnings

__all__ = ["deprecated"]

REMOVED_IN = "0.3.0"


def deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (a ``DeprecationWarning`` pointing
    at the caller's line)."""
    warnings.warn(
        f"{old} is deprecated and will be removed in polyak {REMOVED_IN}; use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
