"""A synthetic weight stream for the post-hoc EMA tests: a drifting random walk on a small model."""

from __future__ import annotations

import torch
from torch import nn


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


class Walk:
    """Moves every float tensor of a model by ``scale * (drift + noise)`` per step.

    The drift is fixed per element, the noise fresh each step (seeded); integer buffers count
    the steps, as BatchNorm's ``num_batches_tracked`` would.
    """

    def __init__(self, model: nn.Module, seed: int = 1, scale: float = 1e-3) -> None:
        self.model = model
        self.gen = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.drift = {
            n: torch.randn(t.shape, generator=self.gen)
            for n, t in model.state_dict().items()
            if t.is_floating_point()
        }

    @torch.no_grad()
    def step(self) -> None:
        for name, t in self.model.state_dict().items():
            if name in self.drift:
                noise = torch.randn(t.shape, generator=self.gen)
                t.add_(self.scale * (self.drift[name] + noise))
            else:
                t.add_(1)


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """All floating tensors of a state dict, in name order, as one float64 vector."""
    return torch.cat(
        [tensors[n].double().ravel() for n in sorted(tensors) if tensors[n].is_floating_point()]
    )


@torch.no_grad()
def set_weights(model: nn.Module, step: int) -> None:
    """Deterministic 'trained' weights of ``step`` (a drift plus noise seeded by the step), so
    that a resumed run sees exactly the weights an uninterrupted one would."""
    for i, t in enumerate(model.state_dict().values()):
        if not t.is_floating_point():
            t.fill_(step)
            continue
        base = torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
        noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(10_000 * step + i))
        t.copy_(base * (1 + 1e-3 * step) + 1e-3 * noise)


def exact_combination(directory, rec) -> dict[str, torch.Tensor]:
    """The float64 reference of a reconstruction: ``sum_i x_i snapshot_i`` over its sources,
    one file at a time (a naive loop over the manifest's files, read with safetensors)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    names = {
        (s["step"], key): directory / e["name"]
        for s in manifest["snapshots"]
        for key, e in s["files"].items()
    }
    out: dict[str, torch.Tensor] = {}
    for (step, key), x in zip(rec.sources, rec.coefficients, strict=True):
        for name, value in load_file(names[(step, key)]).items():
            if value.is_floating_point():
                out[name] = out.get(name, 0) + float(x) * value.double()
    return out


def fp32_bound(rec, exact: dict[str, torch.Tensor]) -> float:
    """A float32 sum's error bound for ``rec``: ``n eps sum_i |x_i| max |snapshot|``."""
    scale = max(float(v.abs().max()) for v in exact.values() if v.numel())
    eps = torch.finfo(torch.float32).eps
    return len(rec.coefficients) * eps * float(abs(rec.coefficients).sum()) * scale
