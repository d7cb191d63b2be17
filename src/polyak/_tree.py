"""Flatten and rebuild nested lists / tuples / dicts of arrays (pure core).

A *tree* is an array or tensor (a leaf), or a list, tuple, namedtuple or mapping of trees. Paths
name leaves for error messages and state dicts: ``"[0]"``, ``"['fc']['weight']"``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["flatten", "framework", "rebuild"]


def framework(x: object) -> str | None:
    """``"numpy"`` for a NumPy array, ``"torch"`` for a torch tensor, else ``None``."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    return None


def flatten(tree: Any, what: str = "tree") -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in a deterministic order (mappings in insertion order)."""
    out: list[tuple[str, Any]] = []

    def walk(x: Any, path: str) -> None:
        if framework(x) is not None:
            out.append((path or "<root>", x))
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        else:
            raise TypeError(
                f"{what} at {path or '<root>'}: expected a NumPy array, a torch tensor, or a "
                f"list/tuple/dict of them; got {type(x).__name__}"
            )

    walk(tree, "")
    return out


def rebuild(tree: Any, leaf: Callable[[int], Any]) -> Any:
    """A tree shaped like ``tree`` whose i-th leaf (in :func:`flatten` order) is ``leaf(i)``."""
    count = [0]

    def walk(x: Any) -> Any:
        if framework(x) is not None:
            count[0] += 1
            return leaf(count[0] - 1)
        if isinstance(x, Mapping):
            return type(x)((k, walk(v)) for k, v in x.items())  # type: ignore[call-arg]
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*(walk(v) for v in x))
        return type(x)(walk(v) for v in x)

    return walk(tree)
