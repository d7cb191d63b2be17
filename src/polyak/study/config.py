"""The study's configuration: one dataclass whose fields are the command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StudyConfig", "add_arguments", "config_from_args"]


@dataclass
class StudyConfig:
    """Everything ``polyak study`` does is set here; every field is a ``--flag``.

    The defaults are the protocol of the README's showcase: Fashion-MNIST (10k train / 5k test),
    a BatchNorm MLP, SGD with Nesterov momentum and a cosine learning rate, 15 epochs, 3 seeds,
    0% and 40% symmetric label noise, and three averages of the weights.
    """

    dataset: str = field(default="auto", metadata={"help": "auto | fashion-mnist | digits"})
    data_dir: str | None = field(default=None, metadata={"help": "directory of the IDX files"})
    train_size: int = field(default=10_000, metadata={"help": "training images (Fashion-MNIST)"})
    test_size: int = field(default=5_000, metadata={"help": "test images (Fashion-MNIST)"})
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of the training set held out to pick the best epoch"}
    )
    model: str = field(default="mlp", metadata={"help": "mlp (BN-MLP 256-256) | cnn"})
    epochs: int = field(default=15, metadata={"help": "training epochs"})
    seeds: int = field(default=3, metadata={"help": "independent runs per noise level"})
    noise: tuple[float, ...] = field(
        default=(0.0, 0.4), metadata={"help": "symmetric label-noise fractions"}
    )
    batch_size: int = field(default=128, metadata={"help": "minibatch size"})
    lr: float = field(default=0.1, metadata={"help": "peak learning rate (cosine to 0)"})
    momentum: float = field(default=0.9, metadata={"help": "Nesterov momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    decays: tuple[float, ...] = field(
        default=(0.99, 0.999, 0.9999), metadata={"help": "per-step decays of the averages"}
    )
    average: str = field(
        default="debiased",
        metadata={"help": "debiased | warmup | constant: how each decay starts"},
    )
    ece_bins: int = field(default=15, metadata={"help": "equal-mass bins of the ECE"})
    regression: bool = field(
        default=True, metadata={"help": "also run the diabetes regression task"}
    )
    regression_splits: int = field(default=10, metadata={"help": "train/test splits (diabetes)"})
    out: str = field(default="polyak-study", metadata={"help": "output directory"})
    quick: bool = field(
        default=False, metadata={"help": "seconds-long run on digits (CI); overrides sizes"}
    )
    workers: int = field(default=2, metadata={"help": "parallel training processes"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per process"})
    progress: bool = field(default=True, metadata={"help": "show progress on stderr"})

    def resolved(self) -> StudyConfig:
        """A validated copy, with ``--quick`` applied."""
        cfg = dataclasses.replace(self)
        if cfg.quick:
            cfg.dataset, cfg.epochs, cfg.seeds = "digits", 12, 2
            cfg.regression_splits = min(cfg.regression_splits, 3)
        if cfg.model not in ("mlp", "cnn"):
            raise ValueError(f"model must be 'mlp' or 'cnn', got {cfg.model!r}")
        if cfg.average not in ("debiased", "warmup", "constant"):
            raise ValueError(f"average must be debiased, warmup or constant, got {cfg.average!r}")
        names = ("epochs", "seeds", "batch_size", "ece_bins", "regression_splits", "workers")
        for name in (*names, "threads"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if not 0.0 < cfg.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {cfg.val_fraction}")
        if not cfg.decays or not all(0.0 < d < 1.0 for d in cfg.decays):
            raise ValueError(f"decays must be in (0, 1), got {cfg.decays}")
        if not cfg.noise or not all(0.0 <= n < 0.9 for n in cfg.noise):
            raise ValueError(f"noise fractions must be in [0, 0.9), got {cfg.noise}")
        return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per :class:`StudyConfig` field."""
    for f in dataclasses.fields(StudyConfig):
        flag = "--" + f.name.replace("_", "-")
        default: Any = f.default
        helptext = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=helptext
            )
        elif str(f.type).startswith("tuple"):
            parser.add_argument(
                flag,
                type=float,
                nargs="+",
                default=list(default),
                help=f"{helptext} (default: {' '.join(map(str, default))})",
            )
        else:
            kind: Any = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            parser.add_argument(
                flag, type=kind, default=default, help=f"{helptext} (default: {default})"
            )


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` of parsed arguments (see :func:`add_arguments`)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)}
    for name in ("noise", "decays"):
        values[name] = tuple(values[name])
    return StudyConfig(**values)
