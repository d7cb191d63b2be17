"""What ``polyak bench`` times: references, polyak's modes and each peer, behind one interface.

Every candidate is built on a model, gets one baseline ``update()`` (peers whose first call copies
do so there), and is then timed on weights that differ from its average, so every timed call does
a real update with a constant decay. Its averaged parameters can then be checked against the
float64 value ``live + (live0 - live) * decay**n``. Memory is read from the torch profiler's
memory events.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Candidate", "clone_model", "measure_update", "memory_of"]


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


def _events(fn: Callable[[], Any]) -> tuple[Any, list[Any]]:
    from torch.profiler import ProfilerActivity, profile

    # The profiler's C++ side (Kineto) prints two "USDT ... profiler_start/stop" lines to stderr
    # per use unless its log level is above 5; it reads the level at its first use in a process.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")

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
