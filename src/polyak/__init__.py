"""polyak: averages of neural-network weights (EMA, uniform/SWA, power-function/EDM2).

``import polyak`` imports NumPy only. The PyTorch API (:class:`EMA`) is imported on first use,
so the NumPy API works without torch installed.

Example:
    >>> import numpy as np, polyak
    >>> avg = np.zeros(3)
    >>> polyak.ema_update_(avg, np.ones(3), decay=0.9)
    array([0.1, 0.1, 0.1])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from polyak import schedules
from polyak.array_ema import ArrayEMA
from polyak.kernels import ema_update, ema_update_

if TYPE_CHECKING:
    from polyak import metrics, presets
    from polyak._torch.ema import EMA
    from polyak.workflows import (
        EarlyStopping,
        ensemble_predictions,
        evaluate,
        hard_update_,
        recompute_bn,
        soft_update_,
        train_with_ema,
    )

__version__ = "0.1.0"

_LAZY = {
    "EMA": ("polyak._torch.ema", "EMA"),
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
}

__all__ = [
    "EMA",
    "ArrayEMA",
    "EarlyStopping",
    "PostHocEMA",
    "__version__",
    "ema_update",
    "ema_update_",
    "ensemble_predictions",
    "evaluate",
    "hard_update_",
    "metrics",
    "posthoc",
    "presets",
    "recompute_bn",
    "schedules",
    "soft_update_",
    "train_with_ema",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'polyak' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
