"""The peers ``polyak bench`` compares with, and the loader of timm's EMA file.

Peers are used as their documentation says, with only the settings needed for a constant decay
updated every call (ema-pytorch: ``update_every=1``, ``update_after_step=0``, ``min_value=beta``;
diffusers: ``min_decay=decay``; torch_ema: ``use_num_updates=False``). timm's package import needs
torchvision, which has no build for the CPU torch used here; its ``timm/utils/model_ema.py``
imports only torch and is loaded by path (the installed file, unchanged). The tests load it
through :func:`timm_model_ema` too. A peer that is missing or fails is skipped with its reason.
"""

from __future__ import annotations

import importlib.util
import types

import torch
from torch import nn

from polyak.cli.bench.candidates import Candidate
from polyak.cli.bench.config import PEERS

__all__ = ["PEERS", "make_peer", "timm_model_ema"]


def timm_model_ema() -> types.ModuleType:
    """timm's ``utils/model_ema.py``, loaded by path (the package import needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed")
    path = f"{next(iter(spec.submodule_search_locations))}/utils/model_ema.py"
    file_spec = importlib.util.spec_from_file_location("_polyak_bench_timm_model_ema", path)
    if file_spec is None or file_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def _params(module: nn.Module) -> list[list[torch.Tensor]]:
    return [list(module.parameters())]


def make_peer(name: str, model: nn.Module, decay: float) -> Candidate:
    """Build peer ``name`` (one of :data:`PEERS`) on ``model``; raises if it is unavailable."""
    if name == "AveragedModel":
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        am = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        return Candidate(
            name,
            "peer",
            lambda: am.update_parameters(model),
            lambda: _params(am.module),
            note="multi_avg_fn=get_ema_multi_avg_fn, use_buffers=True",
            extra={"obj": am},
        )
    if name in ("timm-V2", "timm-V3", "timm-V3-fp32"):
        timm = timm_model_ema()
        if name == "timm-V2":
            ema = timm.ModelEmaV2(model, decay=decay)
        elif name == "timm-V3":
            ema = timm.ModelEmaV3(model, decay=decay)
        else:
            ema = timm.ModelEmaV3(model, decay=decay, dtype=torch.float32)
        note = "dtype=float32" if name.endswith("fp32") else "defaults"
        return Candidate(
            name,
            "peer",
            lambda: ema.update(model),
            lambda: _params(ema.module),
            note=note,
            extra={"obj": ema},
        )
    if name.startswith("ema-pytorch"):
        from ema_pytorch import EMA as LucidEMA

        foreach = name.endswith("foreach")
        ema = LucidEMA(
            model,
            beta=decay,
            update_after_step=0,
            update_every=1,
            min_value=decay,
            use_foreach=foreach,
            include_online_model=False,
        )
        return Candidate(
            name,
            "peer",
            ema.update,
            lambda: _params(ema.ema_model),
            note=f"update_every=1, update_after_step=0, min_value=beta, use_foreach={foreach}",
            extra={"obj": ema},
        )
    if name == "torch_ema":
        from torch_ema import ExponentialMovingAverage

        ema = ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=False)
        return Candidate(
            name,
            "peer",
            ema.update,
            lambda: [list(ema.shadow_params)],
            note="use_num_updates=False; parameters only",
            extra={"obj": ema},
        )
    if name.startswith("diffusers"):
        from diffusers.training_utils import EMAModel

        foreach = name.endswith("foreach")
        params = list(model.parameters())
        ema = EMAModel(params, decay=decay, min_decay=decay, foreach=foreach)
        return Candidate(
            name,
            "peer",
            lambda: ema.step(params),
            lambda: [list(ema.shadow_params)],
            note=f"min_decay=decay, foreach={foreach}; parameters only",
            extra={"obj": ema},
        )
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
