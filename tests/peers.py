"""Access to peer libraries for differential tests.

timm's package imports torchvision at import time, and the registry's torchvision does not load
with the CPU torch used here. ``timm/utils/model_ema.py`` itself imports only torch, so the
benchmark's loader (:func:`polyak.cli.bench.peers.timm_model_ema`) loads that one file by path
(timm's installed file, used unchanged, not copied).
"""

from __future__ import annotations

import types


def timm_model_ema() -> types.ModuleType | None:
    """timm's ``model_ema`` module, or ``None`` (with the reason printed) if it cannot load."""
    from polyak.cli.bench.peers import timm_model_ema as load

    try:
        return load()
    except Exception as e:  # any failure means: skip, never crash
        print(f"timm unavailable: {e!r}")
        return None
