"""A polyak post-hoc store as merge sources: one per snapshot file of the average asked for.

``DIR`` gives the live snapshots (``PostHocEMA(keep_live=True)``): checkpoints of the run, so
every kind of merge weight applies. ``DIR::sigma_rel=S`` (or the store's key, ``sigma0.05``)
gives the snapshots of one average kept, ``DIR::averages`` those of all of them (each source
carries its average's ``gamma``, for :func:`polyak.merge.weights.power` and ``ema``, which then
use EDM2's least-squares coefficients). The manifest is validated by :mod:`polyak.posthoc.store`
and every file is checked against it (size, header, CRC) before the merge reads it, through a
handle opened right after the manifest was read (a run writing the store meanwhile cannot swap
the file).
"""

from __future__ import annotations

import math
from pathlib import Path

from polyak.merge._safetensors import SafetensorsFile
from polyak.merge._source import Reader, Source
from polyak.posthoc.manifest import LIVE
from polyak.posthoc.reader import layout_of, verify
from polyak.posthoc.reading import check_files
from polyak.posthoc.store import open_store

__all__ = ["store_sources"]


def _keys(path: Path, manifest: dict, selector: str | None) -> list[str]:
    averages = manifest["averages"]
    kept = ", ".join(f"{path}::sigma_rel={a['sigma_rel']:g}" for a in averages.values())
    if selector is None:
        if not manifest.get("live"):
            raise ValueError(
                f"{path} keeps no live snapshots (PostHocEMA(keep_live=True)); merge the "
                f"snapshots of an average instead: {kept}, or {path}::averages"
            )
        return [LIVE]
    if selector == "averages":
        return sorted(averages)
    if selector in averages:
        return [selector]
    if selector.startswith("sigma_rel="):
        try:
            wanted = float(selector.removeprefix("sigma_rel="))
        except ValueError:
            wanted = math.nan
        for key, a in averages.items():
            if math.isclose(a["sigma_rel"], wanted, rel_tol=1e-9):
                return [key]
    raise ValueError(f"{path}::{selector}: the store keeps no such average; choose {kept}")


def store_sources(path: Path, selector: str | None) -> list[Source]:
    """The sources of a store: one per snapshot file of the average(s) ``selector`` names."""
    _, ranks = open_store(path, None)
    if len(ranks) > 1:
        raise ValueError(
            f"{path} is a sharded store ({len(ranks)} ranks); reconstruct full tensors with "
            "polyak.posthoc (rank=None) and merge those files"
        )
    r = ranks[0]
    manifest = r.manifest
    keys = _keys(path, manifest, selector)
    layout = layout_of(manifest)
    chosen = [
        (snap, f)
        for snap in manifest["snapshots"]
        for key, f in r.files(snap).items()
        if key in keys
    ]
    chosen.sort(key=lambda sf: (sf[0]["step"], sf[1].key))
    out: list[Source] = []
    with check_files(f for _, f in chosen) as pins:  # all open now, checked before any is used
        try:
            for _, f in chosen:
                verify(f, layout, pins)  # size, header against the manifest, CRC
                st = SafetensorsFile(pins.open(f), f.path)
                read: Reader = st.read
                gamma = None if f.key == LIVE else manifest["averages"][f.key]["gamma"]
                label = f"{path}::{f.key}@{f.step}"
                order = sorted(st.entries, key=lambda n: (st.entries[n].begin, n))
                tensors = {n: (st.entries[n].dtype, st.entries[n].shape) for n in order}
                out.append(
                    Source(
                        label,
                        "store",
                        f.step,
                        tensors,
                        read,
                        [f.path.resolve()],
                        st.close,
                        gamma,
                    )
                )
        except BaseException:
            for s in out:
                s.close()
            raise
    if not out:
        raise ValueError(f"{path} holds no snapshot of {', '.join(keys)} yet")
    return out
