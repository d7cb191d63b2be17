"""The settings of ``polyak bench``: one dataclass whose fields are the command-line flags.

This module imports neither torch nor a peer, so ``polyak --help`` and a bad flag are answered
without loading them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MULTI_SHAPES",
    "PEERS",
    "SHAPES",
    "SWEEP_TENSORS",
    "BenchConfig",
    "add_arguments",
    "config_from_args",
]

SHAPES = ("transformer", "mlp", "resnet50", "transformer-bf16")
"""Model shapes (built by :func:`polyak.cli.bench.models.build_model`)."""

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
"""The peer EMAs the benchmark compares with (built by :func:`polyak.cli.bench.peers.make_peer`)."""

MULTI_SHAPES = ("transformer", "resnet50")  # mlp: 5 averages x 5 candidates of 400 MB
SWEEP_TENSORS = (8, 100, 400, 1000)
"""Tensor counts of the Python-overhead sweep (models of one-element tensors)."""

_SHAPE_HELP = (
    "transformer: 20M parameters in 399 tensors; mlp: 100M in 8 tensors; resnet50: 25.6M in "
    "161 tensors + 159 BatchNorm buffers; transformer-bf16: the transformer in bfloat16"
)
# Measured on a 2-core AMD EPYC: 15 s at load 1-2, 35 s while other jobs kept it at load 5-6.
_QUICK_SECONDS = "about 15 s on 2 idle cores, 35 s on a busy machine"


def _names(value: Any, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    items = tuple(i.strip() for i in items if i.strip())
    bad = [i for i in items if i not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    if not items:
        raise ValueError(f"no {what} given; choose from {', '.join(allowed)}")
    return items


@dataclass
class BenchConfig:
    """Settings of :func:`polyak.cli.bench.run_bench`; each field is a flag (``--multi-shapes``).

    Args:
        shapes: model shapes to time, from :data:`SHAPES`.
        peers: peers to compare with, from :data:`PEERS` (missing ones are skipped and listed).
        repeats: timed rounds per candidate (each round runs every candidate once).
        budget_s: seconds after which a section stops adding rounds (at least 5 are run).
        multi: ``K`` for the several-averages comparison (one EMA with ``K`` decays vs ``K``
            EMAs); 0 or 1 skips it.
        multi_shapes: shapes for that comparison.
        quick: tiny models (same tensor counts), few rounds: a smoke run.
        output_dir: where to write the JSON and Markdown results (``None``: don't write).
        precision: also measure bf16 storage (round-to-nearest, stochastic rounding) against
            float64 over a long stream.
        flush_mib: bytes read between timed calls to evict the caches (0: don't).
        decay: the decay every candidate uses.
        threads: ``torch.set_num_threads`` (``None``: leave as is).
        seed: seed of models, perturbations and round order.
        compile: also time ``compile_update=True`` (and the compile itself, in fresh
            processes with an empty and a warm Inductor cache). Off in quick mode.
        sweep: measure the Python overhead of one update against the tensor count
            (:data:`SWEEP_TENSORS`).

    Examples:
        >>> BenchConfig(quick=True, shapes="mlp").repeats
        3
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
    sweep: bool = True
    scale: float = field(default=1.0, repr=False)  # set by quick mode; tests may shrink further

    def __post_init__(self) -> None:
        self.shapes = _names(self.shapes, SHAPES, "shape")
        self.peers = _names(self.peers, PEERS, "peer") if self.peers else ()
        self.multi_shapes = _names(self.multi_shapes, SHAPES, "multi-shape")
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
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
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
    add = parser.add_argument
    add(
        "--shapes",
        default=",".join(d.shapes),
        metavar="LIST",
        help=f"comma-separated model shapes, from: {', '.join(SHAPES)} ({_SHAPE_HELP}); "
        "default: all",
    )
    add(
        "--peers",
        default=",".join(d.peers),
        metavar="LIST",
        help=f"comma-separated peers to compare with, from: {', '.join(PEERS)}; peers that "
        "are not installed are skipped and listed; default: all; '' for none",
    )
    add(
        "--repeats",
        type=int,
        default=d.repeats,
        help="timed rounds per candidate, each round in a shuffled order (default: %(default)s)",
    )
    add(
        "--budget-s",
        type=float,
        default=d.budget_s,
        help="seconds after which a table stops adding rounds, at least 5 are run "
        "(default: %(default)s)",
    )
    add(
        "--multi",
        type=int,
        default=d.multi,
        help="K for one EMA with K averages against K EMAs; 0 skips it (default: %(default)s)",
    )
    add(
        "--multi-shapes",
        default=",".join(d.multi_shapes),
        metavar="LIST",
        help="shapes for the several-averages comparison (default: %(default)s)",
    )
    add(
        "--quick",
        action="store_true",
        help=f"a smoke run: models at 2%% width (same tensor counts), 3 rounds, no cache flush, "
        f"no compile; {_QUICK_SECONDS} (measured on a 2-core AMD EPYC)",
    )
    add(
        "--output-dir",
        default=d.output_dir,
        metavar="DIR",
        help="where the .json and .md results are written (default: %(default)s)",
    )
    add("--no-save", action="store_true", help="print the tables only, write no files")
    add("--no-precision", action="store_true", help="skip the bf16-storage-against-float64 section")
    add(
        "--no-sweep",
        action="store_true",
        help=f"skip the Python-overhead sweep over {', '.join(map(str, SWEEP_TENSORS))} tensors",
    )
    add(
        "--flush-mib",
        type=int,
        default=d.flush_mib,
        help="MiB read before each timed call to evict the caches; 0: none (default: %(default)s)",
    )
    add(
        "--decay",
        type=float,
        default=d.decay,
        help="the decay every candidate uses (default: %(default)s)",
    )
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of models, perturbations and round order (default: %(default)s)",
    )
    add(
        "--no-compile",
        action="store_true",
        help="skip compile_update=True and the compile-time probe (always skipped by --quick)",
    )


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
        sweep=not args.no_sweep,
    )
