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


def walked_store(directory):
    """A float32 post-hoc store of :func:`small_model` after 100 steps of :class:`Walk`, a
    snapshot every 10 steps; ``directory`` is returned."""
    import polyak

    model = small_model()
    ph = polyak.PostHocEMA(model, directory, snapshot_every=10, snapshot_dtype=torch.float32)
    walk = Walk(model)
    for _ in range(100):
        walk.step()
        ph.update()
    ph.close()
    return directory


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


def exact_combination(directory, rec, manifest_name="manifest.json") -> dict[str, torch.Tensor]:
    """The float64 reference of a reconstruction: ``sum_i x_i snapshot_i`` over its sources,
    one file at a time (a naive loop over the manifest's files, read with safetensors)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = json.loads((directory / manifest_name).read_text())
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


# ---------------------------------------------------------------- crafted stores
def manifest_of(directory, name: str = "manifest.json") -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(directory) / name).read_text())


def write_manifest(directory, manifest: dict, name: str = "manifest.json") -> None:
    """Write a (crafted) manifest as a hand edit would: plain JSON, no checks."""
    import json
    from pathlib import Path

    (Path(directory) / name).write_text(json.dumps(manifest, indent=1))


def crc_entry(path, algorithm: str = "crc32") -> dict:
    """``{"bytes", algorithm}`` of a file, computed here with zlib or crc32c directly."""
    import zlib
    from pathlib import Path

    data = Path(path).read_bytes()
    if algorithm == "crc32c":
        import crc32c

        value = crc32c.crc32c(data)
    else:
        value = zlib.crc32(data)
    return {"bytes": len(data), algorithm: f"{value:08x}"}


def resave(path, change) -> None:
    """Re-write a snapshot file with ``change(tensors)`` applied, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    save_file(change(tensors), str(path), metadata=metadata)


def refresh_entries(directory, name: str = "manifest.json") -> None:
    """Make a manifest's sizes and checksums those of its files again (after a crafted edit
    of the files): what an adversary who edits both would do."""
    from pathlib import Path

    manifest = manifest_of(directory, name)
    for snap in manifest["snapshots"]:
        for entry in snap["files"].values():
            algorithm = "crc32c" if "crc32c" in entry else "crc32"
            entry.update(crc_entry(Path(directory) / entry["name"], algorithm))
    write_manifest(directory, manifest, name)


def shard_store(source, target, world: int = 2) -> None:
    """A sharded store (``manifest.rank{r}.json``) made from an unsharded one: every averaged
    tensor of 1+ dimensions split along dim 0 as FSDP2 would, the others replicated; each
    rank's files and manifest as its writer would write them (for tests without processes)."""
    import copy
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    base = manifest_of(source)
    for r in range(world):
        m = copy.deepcopy(base)
        m.update(rank=r, world_size=world, sharded=True)
        spans = {}
        for name, info in m["tensors"].items():
            shape = info["shape"]
            if info["kind"] == "average" and shape and shape[0] >= world:
                per = -(-shape[0] // world)
                lo, hi = min(r * per, shape[0]), min((r + 1) * per, shape[0])
                spans[name] = (lo, hi)
                local = [hi - lo, *shape[1:]]
                info["shard"] = {
                    "global_shape": shape,
                    "offset": [lo] + [0] * (len(shape) - 1),
                    "local_shape": local,
                }
                info["shape"] = local
        for snap in m["snapshots"]:
            for key, entry in snap["files"].items():
                with safe_open(str(source / entry["name"]), "pt") as f:
                    metadata = f.metadata()
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                for name, (lo, hi) in spans.items():
                    tensors[name] = tensors[name][lo:hi].clone()
                name = entry["name"].replace(".safetensors", f"-rank{r}.safetensors")
                save_file(tensors, str(target / name), metadata=metadata)
                algorithm = "crc32c" if "crc32c" in entry else "crc32"
                snap["files"][key] = {"name": name, **crc_entry(target / name, algorithm)}
        write_manifest(target, m, f"manifest.rank{r}.json")
