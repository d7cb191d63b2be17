"""``polyak bench``: time the EMA update of polyak and its peers on this machine.

A tool built on polyak's public API (nothing in the library imports it). One process,
interleaved rounds (a shuffled order each round, the caches flushed before each timed call, as a
training step would leave them), medians. Each shape is measured against two references on the
same number of elements: a ``copy_`` and a ``lerp_`` over one contiguous buffer (the memory
roofline: an update reads the weights and reads and writes the average), and, for float32
models, a bare ``torch._foreach_lerp_`` over the lists :meth:`polyak.EMA.update_lists` gives
(the floor when the weights are scattered). Every candidate's averages are checked against a
float64 reference as it goes. Memory: what building a candidate left allocated ("held"), and
bytes allocated by one update, both from the torch profiler's memory events. A sweep measures
the Python overhead of one update at 8 to 1000 tensors.

Modules: :mod:`~polyak.cli.bench.config` (settings, flags), :mod:`~polyak.cli.bench.models` (the
shapes), :mod:`~polyak.cli.bench.peers` (the peers and their loader),
:mod:`~polyak.cli.bench.candidates` (one interface over everything timed),
:mod:`~polyak.cli.bench.run` (the timed tables), :mod:`~polyak.cli.bench.probes` (overhead, compile
time, bf16 precision), :mod:`~polyak.cli.bench.report` (tables and files).

Example:
    >>> from polyak.cli.bench import BenchConfig, run_bench
    >>> config = BenchConfig(quick=True, shapes="mlp", peers="", multi=0, output_dir=None,
    ...                      precision=False, sweep=False)
    >>> config.scale = 0.005  # a 25x25 MLP: this example takes about a second
    >>> result = run_bench(config)  # doctest: +ELLIPSIS
    polyak bench: ...
    >>> [row["name"] for row in result["sections"][0]["rows"]][:2]
    ['polyak', 'polyak flat_params']

Command line: ``polyak bench [--quick] [--shapes transformer,mlp] [--peers ...]`` (see
``polyak bench --help``), or ``python benchmarks/run.py``. Peers that are not installed are
skipped and listed.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from polyak.cli.bench.config import (
    PEERS,
    SHAPES,
    SWEEP_TENSORS,
    BenchConfig,
    add_arguments,
    config_from_args,
)

__all__ = [
    "PEERS",
    "SHAPES",
    "SWEEP_TENSORS",
    "BenchConfig",
    "add_arguments",
    "config_from_args",
    "run_bench",
]


def run_bench(config: BenchConfig | None = None) -> dict[str, Any]:
    """Run the comparison, print progress and tables, write results; returns them as a dict.

    The dict has ``machine``, ``versions``, ``config``, ``load``, ``sections`` (one per shape:
    a row per candidate with median/quartile times, GB/s, ratios, memory, ops and the check
    against float64), ``skipped`` peers with reasons, ``multi``, ``sweep``, ``precision`` and
    ``goals``. The output directory is created (and must be writable) before anything is timed.
    """
    import torch

    from polyak.cli import common
    from polyak.cli.bench import probes, report, run

    config = config or BenchConfig()
    if config.output_dir is not None:
        common.check_output_dir(config.output_dir, "output_dir")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    result: dict[str, Any] = {
        "machine": report.machine(),
        "versions": report.versions(),
        "config": asdict(config),
        "load": {"before": list(os.getloadavg())},
        "sections": [],
        "multi": [],
        "skipped": {},
    }
    print(report.header(result), flush=True)
    flusher = run.Flusher(config.flush_mib)
    for shape in config.shapes:
        section = run.run_shape(shape, config, flusher)
        result["sections"].append(section)
        result["skipped"].update(section.pop("skipped"))
        print(report.section_table(section), flush=True)
    if config.multi >= 2:
        for shape in [s for s in config.multi_shapes if s in config.shapes]:
            multi = run.run_multi(shape, config, flusher)
            result["multi"].append(multi)
            print(report.multi_table(multi), flush=True)
    if config.sweep:
        result["sweep"] = probes.overhead_sweep(config)
        print(report.sweep_table(result["sweep"]), flush=True)
    if config.compile and not config.quick:
        result["compile"] = probes.run_compile_probe(config)
        print(report.compile_line(result["compile"]), flush=True)
    if config.precision:
        result["precision"] = probes.run_precision(config)
        print(report.precision_table(result["precision"]), flush=True)
    result["load"]["after"] = list(os.getloadavg())
    result["goals"] = report.goals(result)
    print(report.goals_table(result["goals"]), flush=True)
    if result["skipped"]:
        print(report.skipped_list(result["skipped"]), flush=True)
    if config.output_dir is not None:
        paths = report.write(result, config.output_dir)
        print("results written to " + ", ".join(paths), flush=True)
        result["paths"] = paths
    return result
