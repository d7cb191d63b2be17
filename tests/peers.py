"""Access to peer libraries for differential tests.

timm's package imports torchvision at import time, and the registry's torchvision does not load
with the CPU torch used here. ``timm/utils/model_ema.py`` itself imports only torch, so we load
that one file by path (a documented shim; timm's code is used unchanged, not copied).
"""

from __future__ import annotations

import importlib.util
import types


def timm_model_ema() -> types.ModuleType | None:
    """timm's ``model_ema`` module, or ``None`` (with the reason printed) if it cannot load."""
    try:
        spec = importlib.util.find_spec("timm")
    except (ImportError, ValueError) as e:
        print(f"timm unavailable: {e}")
        return None
    if spec is None or not spec.submodule_search_locations:
        print("timm unavailable: not installed")
        return None
    path = f"{next(iter(spec.submodule_search_locations))}/utils/model_ema.py"
    try:
        file_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
        assert file_spec is not None and file_spec.loader is not None
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    except Exception as e:  # any failure means: skip, never crash
        print(f"timm unavailable: loading {path} failed: {e!r}")
        return None
    return module
