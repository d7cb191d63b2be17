"""What ``polyak bench`` times: references, polyak's modes and each peer, behind one interface.

Every candidate is built on a model, gets one baseline ``update()`` (peers whose first call copies
do so there), and is then timed on weights that differ from its average, so every timed call does
a real update with a constant decay. Its averaged parameters can then be checked against the
float64 value ``live + (live0 - live) * decay**n``.

Peers are used as their documentation says, with only the settings needed for a constant decay
updated every call (ema-pytorch: ``update_every=1``, ``update_after_step=0``, ``min_value=beta``;
diffusers: ``min_decay=decay``; torch_ema: ``use_num_updates=False``). timm's package import needs
torchvision; its ``utils/model_ema.py`` imports only torch and is loaded by path (an unchanged
file of the installed package). A peer that is missing or fails is skipped with its reason.
"""

from __future__ import annotations

import copy
import importlib.util
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from polyak.bench import PEERS

__all__ = ["PEERS", "Candidate", "make_peer", "measure_update", "memory_of", "timm_model_ema"]


@dataclass
class Candidate:
    """``update``: one update; ``averages``: its averaged parameters in ``model.parameters()``
    order (``None``: not checkable); ``rows``: several averages' decays (K>1) else one."""

    name: str
    kind: str  # "reference" | "polyak" | "peer"
    update: Callable[[], None]
    averages: Callable[[], list[list[torch.Tensor]]] | None = None
    decays: tuple[float, ...] = ()
    note: str = ""
    calls: int = 0
    held: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> None:
        self.update()
        self.calls += 1


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
    raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")


def _events(fn: Callable[[], Any]) -> tuple[Any, list[Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, list(prof.events())


def memory_of(build: Callable[[], Any]) -> tuple[Any, int]:
    """``build()`` and the bytes it left allocated (profiler memory events: allocs - frees)."""
    out, events = _events(build)
    return out, sum(e.self_cpu_memory_usage for e in events)


def measure_update(candidate: Candidate) -> dict[str, int]:
    """Bytes allocated (gross, profiler memory events) and top-level ATen ops of one update."""
    _, events = _events(candidate)
    allocated = sum(max(0, e.self_cpu_memory_usage) for e in events)
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    return {"allocated": allocated, "ops": ops}


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (its own storage) of ``model``."""
    return copy.deepcopy(model)
