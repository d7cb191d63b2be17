"""``polyak bench``: time the EMA update of polyak and its peers on this machine.

One process, interleaved rounds (a shuffled order each round, the caches flushed before each
timed call, as a training step would leave them), medians. Each shape is measured against two
references on the same number of elements: a ``copy_`` and a ``lerp_`` over one contiguous
buffer (the memory roofline: an update reads the weights and reads and writes the average), and,
for float32 models, a bare ``torch._foreach_lerp_`` over cached lists of the same tensors (the
floor when the weights are scattered). Every candidate's averages are checked against a float64
reference as it goes. Memory: what building a candidate left allocated ("held"), and bytes
allocated by one update, both from the torch profiler's memory events.

Example:
    >>> from polyak.bench import BenchConfig, run_bench
    >>> result = run_bench(BenchConfig(quick=True, output_dir=None))  # doctest: +SKIP

Command line: ``polyak bench [--quick] [--shapes transformer,mlp] [--peers ...]``, or
``python benchmarks/run.py``. Peers that are not installed are skipped and listed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PEERS", "SHAPES", "BenchConfig", "add_arguments", "config_from_args", "run_bench"]

SHAPES = ("transformer", "mlp", "resnet50", "transformer-bf16")
PEERS = (
    "AveragedModel",
    "timm-V2",
    "timm-V3",
    "ema-pytorch",
    "ema-pytorch-foreach",
    "torch_ema",
    "diffusers",
    "diffusers-foreach",
)
MULTI_SHAPES = ("transformer", "resnet50")  # mlp: 5 averages x 5 candidates of 400 MB


def _names(value: Any, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    items = tuple(i.strip() for i in items if i.strip())
    bad = [i for i in items if i not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown {bad}; choose from {list(allowed)}")
    return items


@dataclass
class BenchConfig:
    """Settings of :func:`run_bench`; each field is a command-line flag (``--multi-shapes``).

    Args:
        shapes: model shapes to time (``transformer``, ``mlp``, ``resnet50``,
            ``transformer-bf16``; see :mod:`polyak._torch.bench_models`).
        peers: peers to compare with (missing ones are skipped and listed).
        repeats: timed rounds per candidate (each round runs every candidate once).
        budget_s: seconds after which a section stops adding rounds (at least 5 are run).
        multi: ``K`` for the several-averages comparison (one EMA with ``K`` decays vs ``K``
            EMAs); 0 or 1 skips it.
        multi_shapes: shapes for that comparison.
        quick: tiny models (same tensor counts), few rounds: a smoke run in seconds.
        output_dir: where to write the JSON and Markdown results (``None``: don't write).
        precision: also measure bf16 storage (round-to-nearest, stochastic rounding) against
            float64 over a long stream.
        flush_mib: bytes written between timed calls to evict the caches (0: don't).
        decay: the decay every candidate uses.
        threads: ``torch.set_num_threads`` (``None``: leave as is).
        seed: seed of models, perturbations and round order.
        compile: also time ``compile_update=True`` (and the compile itself, in fresh
            processes with an empty and a warm Inductor cache). Off in quick mode.
    """

    shapes: tuple[str, ...] = SHAPES
    peers: tuple[str, ...] = PEERS
    repeats: int = 25
    budget_s: float = 90.0
    multi: int = 5
    multi_shapes: tuple[str, ...] = MULTI_SHAPES
    quick: bool = False
    output_dir: str | None = "benchmarks/results"
    precision: bool = True
    flush_mib: int = 512
    decay: float = 0.999
    threads: int | None = None
    seed: int = 0
    compile: bool = True
    scale: float = field(default=1.0, repr=False)  # set by quick mode; tests may shrink further

    def __post_init__(self) -> None:
        self.shapes = _names(self.shapes, SHAPES, "shapes")
        self.peers = _names(self.peers, PEERS, "peers")
        self.multi_shapes = _names(self.multi_shapes, SHAPES, "multi_shapes")
        for name in ("repeats", "multi", "flush_mib", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be positive, got {self.budget_s!r}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if self.quick:
            self.repeats = min(self.repeats, 3)
            self.multi = min(self.multi, 3)
            self.multi_shapes = self.multi_shapes[:1]
            self.flush_mib = 0
            self.compile = False  # a compile takes longer than the whole quick run
            self.scale = min(self.scale, 0.02)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`BenchConfig` field to ``parser``."""
    d = BenchConfig()
    parser.add_argument("--shapes", default=",".join(d.shapes), help="comma-separated shapes")
    parser.add_argument("--peers", default=",".join(d.peers), help="comma-separated peers")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds")
    parser.add_argument("--budget-s", type=float, default=d.budget_s, help="seconds per table")
    parser.add_argument("--multi", type=int, default=d.multi, help="K averages in one EMA")
    parser.add_argument("--multi-shapes", default=",".join(d.multi_shapes))
    parser.add_argument("--quick", action="store_true", help="tiny models, a few seconds")
    parser.add_argument("--output-dir", default=d.output_dir, help="where results go")
    parser.add_argument("--no-save", action="store_true", help="print only, write nothing")
    parser.add_argument("--no-precision", action="store_true", help="skip the bf16 section")
    parser.add_argument("--flush-mib", type=int, default=d.flush_mib, help="cache flush size")
    parser.add_argument("--decay", type=float, default=d.decay)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--no-compile", action="store_true", help="skip compile_update")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` for parsed ``args`` (from :func:`add_arguments`)."""
    return BenchConfig(
        shapes=args.shapes,
        peers=args.peers,
        repeats=args.repeats,
        budget_s=args.budget_s,
        multi=args.multi,
        multi_shapes=args.multi_shapes,
        quick=args.quick,
        output_dir=None if args.no_save else args.output_dir,
        precision=not args.no_precision,
        flush_mib=args.flush_mib,
        decay=args.decay,
        threads=args.threads,
        seed=args.seed,
        compile=not args.no_compile,
    )


def run_bench(config: BenchConfig | None = None) -> dict[str, Any]:
    """Run the comparison, print progress and tables, write results; returns them as a dict.

    The dict has ``machine``, ``versions``, ``config``, ``load``, ``sections`` (one per shape:
    a row per candidate with median/quartile times, GB/s, ratios, memory, ops and the check
    against float64), ``skipped`` peers with reasons, ``multi``, ``precision`` and ``goals``.
    """
    import torch

    from polyak._torch import bench_probes as probes
    from polyak._torch import bench_report as report
    from polyak._torch import bench_run as run

    config = config or BenchConfig()
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polyak bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    run_bench(config_from_args(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
