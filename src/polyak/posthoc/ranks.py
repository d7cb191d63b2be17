"""A sharded store read on one process: the snapshots every rank holds, full tensors from shards.

Under FSDP2 each rank writes its own shards and manifest, each at its own pace: while a run
writes, rank 0 may have published step 40 when rank 1 is still writing it, or have thinned a
snapshot that rank 1 still lists. :func:`common_snapshots` keeps the snapshots every rank holds
(and says so when that leaves some out), so a reconstruction combines one consistent set.
:func:`assemble` copies the ranks' shards into full tensors after checking that the shards, as
the manifests place them, cover each tensor exactly within its global shape: no region is left
uninitialised, and no global shape claims more memory than the shards on disk hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from polyak._warn import warn
from polyak.posthoc.errors import StoreError
from polyak.posthoc.store import RankStore

__all__ = ["assemble", "common_snapshots"]


def common_snapshots(ranks: list[RankStore]) -> list[RankStore]:
    """Every rank's manifest restricted to the steps all ranks hold (a warning names the rest).

    Raises:
        StoreError: ranks that record a different time ``t`` for the same step.
    """
    if len(ranks) < 2:
        return ranks
    steps = [{s["step"]: s["t"] for s in r.manifest["snapshots"]} for r in ranks]
    common = set(steps[0]).intersection(*steps[1:])
    for r, own in zip(ranks, steps):
        for step in common:
            if own[step] != steps[0][step]:
                raise StoreError(
                    f"{r.path}: the snapshot of step {step} has t={own[step]}, rank 0's "
                    f"t={steps[0][step]}; the ranks' manifests do not belong together"
                )
    left_out = {
        r.rank: sorted(set(own) - common) for r, own in zip(ranks, steps) if set(own) - common
    }
    if left_out:
        warn(
            f"{ranks[0].path.parent}: using the {len(common)} snapshot(s) every rank holds; "
            f"only some ranks hold the steps {left_out} (a write in progress, or a rank's write "
            "failed)"
        )
    out = []
    for r in ranks:
        manifest = {
            **r.manifest,
            "snapshots": [s for s in r.manifest["snapshots"] if s["step"] in common],
        }
        out.append(replace(r, manifest=manifest))
    return out


def assemble(
    parts: Sequence[Sequence[Mapping[str, torch.Tensor]]], ranks: list[RankStore]
) -> list[dict[str, torch.Tensor]]:
    """``parts[rank][k]``, the k-th result of each rank, as full tensors: ``[{name: tensor}]``.

    A tensor without a shard is taken from rank 0 (every rank holds it whole).

    Raises:
        StoreError: shards that do not cover a tensor's global shape.
    """
    tables = [r.manifest["tensors"] for r in ranks]
    for name, info in tables[0].items():
        if info.get("shard") is not None:
            _check_cover(name, [t[name]["shard"] for t in tables], ranks)
    out = []
    for k, first in enumerate(parts[0]):
        full: dict[str, torch.Tensor] = {}
        for name, info in tables[0].items():
            if info.get("shard") is None:
                full[name] = first[name]
                continue
            full[name] = torch.empty(info["shard"]["global_shape"], dtype=first[name].dtype)
            for table, part in zip(tables, parts):
                view = full[name]
                shard = table[name]["shard"]
                for dim, (lo, size) in enumerate(zip(shard["offset"], shard["local_shape"])):
                    view = view.narrow(dim, lo, size)
                view.copy_(part[k][name])
        out.append(full)
    return out


def _check_cover(name: str, shards: list[dict[str, Any]], ranks: list[RankStore]) -> None:
    """The boxes ``offset + local_shape`` cover ``global_shape`` (each was checked inside it).

    The global volume is first compared with the shards' (the files' tensors, read from disk),
    so the coverage mask below is never larger than the data behind it."""
    shape = shards[0]["global_shape"]
    held = sum(math.prod(s["local_shape"]) for s in shards)
    if math.prod(shape) > held:
        raise StoreError(
            f"{ranks[0].path.parent}: the ranks' shards of {name!r} hold {held} elements, its "
            f"global shape {shape} needs {math.prod(shape)}; a rank's manifest was edited"
        )
    covered = torch.zeros(shape, dtype=torch.bool)
    for s in shards:
        view = covered
        for dim, (lo, size) in enumerate(zip(s["offset"], s["local_shape"])):
            view = view.narrow(dim, lo, size)
        view.fill_(True)
    if not bool(covered.all()):
        raise StoreError(
            f"{ranks[0].path.parent}: the ranks' shards of {name!r} leave part of its global "
            f"shape {shape} uncovered; a rank's manifest was edited"
        )
