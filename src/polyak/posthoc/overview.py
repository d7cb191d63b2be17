"""What a store holds, and how well it can represent a target, without reading any tensor.

:func:`list_snapshots` describes the snapshots (``polyak posthoc DIR --list``);
:func:`weight_profiles` gives, for each target, the weight the reconstruction puts on each
stretch of training next to the weight the target would put there (the data of a
"target vs achieved profile" plot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyak._horizon import integer
from polyak.posthoc import reader
from polyak.posthoc.plan import solutions_for, targets_from
from polyak.posthoc.profiles import Solution, profile_masses, target_masses
from polyak.posthoc.reading import check_files, read_consistent
from polyak.posthoc.store import StoreError, open_store, unlisted_files

__all__ = ["Listing", "WeightProfile", "list_snapshots", "weight_profiles"]


@dataclass(frozen=True)
class Listing:
    """The contents of a store, as :func:`list_snapshots` finds them; ``str()`` is a table.

    Attributes:
        directory, run_id, snapshot_dtype, start_step, world_size: from the manifest(s).
        averages: ``{key: {"sigma_rel", "gamma", "name"}}`` of the stored averages.
        live: whether live weights are stored too.
        snapshots: ``[{"step", "t", "ranks", "files", "bytes", "problems"}]`` in step order;
            ``problems`` lists checksum failures (only with ``verify=True``).
        ignored: files in the directory that no manifest lists (never read).
    """

    directory: Path
    run_id: str
    snapshot_dtype: str
    start_step: int
    world_size: int
    averages: dict[str, dict[str, Any]]
    live: bool
    snapshots: list[dict[str, Any]] = field(repr=False)
    ignored: list[str] = field(repr=False)

    def __str__(self) -> str:
        avgs = ", ".join(
            f"sigma_rel {a['sigma_rel']:g} (gamma {a['gamma']:.4g})" for a in self.averages.values()
        )
        lines = [
            f"store {self.directory}: run {self.run_id}, {self.snapshot_dtype}, "
            f"{self.world_size} rank(s), start_step {self.start_step}",
            f"averages: {avgs}; live weights: {'yes' if self.live else 'no'}",
            f"{'step':>10} {'t':>10} {'files':>6} {'MiB':>10}  status",
        ]
        for s in self.snapshots:
            status = "; ".join(s["problems"]) if s["problems"] else "ok" if s["verified"] else "-"
            mib = s["bytes"] / 2**20
            lines.append(f"{s['step']:>10} {s['t']:>10} {s['files']:>6} {mib:>10.1f}  {status}")
        total = sum(s["bytes"] for s in self.snapshots) / 2**20
        lines.append(f"{len(self.snapshots)} snapshot(s), {total:.1f} MiB")
        if self.ignored:
            lines.append(f"ignored (not in a manifest): {', '.join(self.ignored)}")
        return "\n".join(lines)


def list_snapshots(directory: str | Path, *, verify: bool = False) -> Listing:
    """Describe a store: its run, averages and snapshots, and the files it ignores.

    Args:
        directory: the store.
        verify: also check every file: a regular file in the store, of the recorded size,
            holding the manifest's tensors, of the recorded checksum (reads all of them);
            failures are reported in the listing, not raised.

    Examples:
        >>> import tempfile, torch, polyak
        >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
        >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10)
        >>> for step in range(100):  # after each optimizer step
        ...     ph.update()
        >>> ph.close()  # waits for the last write
        >>> listing = polyak.posthoc.list_snapshots(store, verify=True)
        >>> len(listing.snapshots), listing.snapshots[-1]["problems"], listing.ignored
        (10, [], [])
    """
    path, ranks = open_store(directory, None, warn=False)
    first = ranks[0].manifest
    rows: dict[int, dict[str, Any]] = {}
    for r in ranks:
        layout = reader.layout_of(r.manifest)
        for snap in r.manifest["snapshots"]:
            row = rows.setdefault(
                snap["step"],
                {"step": snap["step"], "t": snap["t"], "ranks": [], "files": 0, "bytes": 0},
            )
            row.update(verified=verify, problems=row.get("problems", []))
            row["ranks"].append(r.rank)
            for f in r.files(snap).values():
                row["files"] += 1
                row["bytes"] += f.size
                if verify:
                    try:
                        with check_files([f]) as pins:
                            reader.verify(f, layout, pins)
                    except StoreError as e:
                        row["problems"].append(str(e))
    return Listing(
        directory=path,
        run_id=first["run_id"],
        snapshot_dtype=first["snapshot_dtype"],
        start_step=first["start_step"],
        world_size=first["world_size"],
        averages=first["averages"],
        live=bool(first.get("live")),
        snapshots=[rows[s] for s in sorted(rows)],
        ignored=unlisted_files(path, ranks),
    )


@dataclass(frozen=True)
class WeightProfile:
    """Target vs achieved weight over training time for one target.

    Attributes:
        label: the target (``"sigma_rel=0.08"``).
        step: the step reconstructed; ``t`` its time since averaging started.
        edges: bin edges in optimizer steps since averaging started (``0 .. t``).
        target, achieved: weight per optimizer step in each bin (densities: ``sum(density *
            width) == 1``).
        fit: relative L2 distance between the two profiles.
        solution: the coefficients and snapshots behind ``achieved``.
    """

    label: str
    step: int
    t: float
    edges: np.ndarray = field(repr=False)
    target: np.ndarray = field(repr=False)
    achieved: np.ndarray = field(repr=False)
    fit: float
    solution: Solution = field(repr=False)


def weight_profiles(
    directory: str | Path,
    sigma_rels: Sequence[float] = (),
    *,
    decays: Sequence[float] = (),
    gammas: Sequence[float] = (),
    step: int | None = None,
    bins: int = 400,
) -> list[WeightProfile]:
    """For each target, the weight profile a reconstruction would achieve and the target's.

    Reads only the manifest (the coefficients are those :func:`reconstruct_many` uses). Plot
    ``achieved`` and ``target`` against ``edges`` (e.g. as steps) to see whether the snapshots
    suffice: they should overlap, and ``fit`` should be small.

    Examples:
        >>> import tempfile, torch, polyak
        >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
        >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10)
        >>> for step in range(100):  # after each optimizer step
        ...     ph.update()
        >>> ph.close()  # waits for the last write
        >>> p = polyak.posthoc.weight_profiles(store, [0.08], bins=100)[0]
        >>> p.label, p.edges.shape, p.fit < 0.02  # plt.stairs(p.achieved, p.edges)
        ('sigma_rel=0.08', (101,), True)
    """
    bins = integer("bins", bins, 1)
    targets = targets_from(sigma_rels, gammas, decays)
    at, _, solutions = read_consistent(
        directory, None, lambda path, ranks: solutions_for(ranks[0], step, targets), warn=False
    )
    out = []
    for s in solutions:
        edges = np.linspace(0.0, s.t, bins + 1)
        width = np.diff(edges)
        achieved = profile_masses(edges, s.ts, s.gammas, s.coefficients) / width
        target = target_masses(edges, s.t, s.target) / width
        out.append(WeightProfile(s.target.label, at, s.t, edges, target, achieved, s.fit, s))
    return out
