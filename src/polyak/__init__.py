"""polyak: averages of neural-network weights (EMA, uniform/SWA, power-function/EDM2).

``import polyak`` imports NumPy only. The PyTorch API (:class:`EMA`, the workflows) is imported on
first use, so the NumPy API works without torch installed; without it, ``polyak.EMA`` raises an
``ImportError`` that says how to install it.

Example:
    >>> import numpy as np, polyak
    >>> avg = np.zeros(3)
    >>> polyak.ema_update_(avg, np.ones(3), decay=0.9)
    array([0.1, 0.1, 0.1])
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from polyak import schedules
from polyak.array_ema import ArrayEMA
from polyak.errors import (
    CheckpointError,
    ModelChangedError,
    NonFiniteError,
    SwappedStateDictWarning,
)
from polyak.kernels import ema_update, ema_update_

if _TYPE_CHECKING:
    from polyak import averages, merge, metrics, posthoc, presets
    from polyak._torch.ema import EMA
    from polyak._torch.swag import SWAG
    from polyak.posthoc import PostHocEMA
    from polyak.workflows import (
        EarlyStopping,
        ensemble_predictions,
        evaluate,
        hard_update_,
        recompute_bn,
        soft_update_,
        train_with_ema,
    )

# Public names imported on first use: name -> (module, attribute; None: the module itself).
# A new name goes here, in __all__, and under _TYPE_CHECKING above (for type checkers).
_LAZY: dict[str, tuple[str, str | None]] = {
    "EMA": ("polyak._torch.ema", "EMA"),
    "SWAG": ("polyak._torch.swag", "SWAG"),
    "averages": ("polyak.averages", None),
    "metrics": ("polyak.metrics", None),
    "presets": ("polyak.presets", None),
    "train_with_ema": ("polyak.workflows", "train_with_ema"),
    "evaluate": ("polyak.workflows", "evaluate"),
    "EarlyStopping": ("polyak.workflows", "EarlyStopping"),
    "recompute_bn": ("polyak.workflows", "recompute_bn"),
    "soft_update_": ("polyak.workflows", "soft_update_"),
    "hard_update_": ("polyak.workflows", "hard_update_"),
    "ensemble_predictions": ("polyak.workflows", "ensemble_predictions"),
    "PostHocEMA": ("polyak.posthoc", "PostHocEMA"),
    "posthoc": ("polyak.posthoc", None),
    "merge": ("polyak.merge", None),
}

# An optional dependency (top-level module) -> the extra that installs it.
_EXTRAS = {"torch": "torch"}

__all__ = [
    "EMA",
    "SWAG",
    "ArrayEMA",
    "CheckpointError",
    "EarlyStopping",
    "ModelChangedError",
    "NonFiniteError",
    "PostHocEMA",
    "SwappedStateDictWarning",
    "__version__",
    "averages",
    "ema_update",
    "ema_update_",
    "ensemble_predictions",
    "evaluate",
    "hard_update_",
    "merge",
    "metrics",
    "posthoc",
    "presets",
    "recompute_bn",
    "schedules",
    "soft_update_",
    "train_with_ema",
]


def _version() -> str:
    """The installed distribution's version: the one place it is written is pyproject.toml."""
    from importlib import metadata

    try:
        return metadata.version("polyak")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> object:
    if name == "__version__":
        globals()[name] = version = _version()
        return version
    if name not in _LAZY:
        raise AttributeError(f"module 'polyak' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    try:
        module = _importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in _EXTRAS:
            raise
        raise ImportError(
            f"polyak.{name} needs {root}, which is not installed: "
            f'pip install "polyak[{_EXTRAS[root]}]"',
            name=e.name,
        ) from e
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
