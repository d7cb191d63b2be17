"""The study's configuration: one dataclass whose fields are the command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DATASETS", "StudyConfig", "add_arguments", "config_from_args"]

DATASETS = ("auto", "fashion-mnist", "digits")
"""Classification sets the study trains on (``auto``: Fashion-MNIST if installed, else digits)."""

# Fields that define the protocol the goals were set for (the rest only say where and how fast).
_PROTOCOL = (
    "train_size", "test_size", "val_fraction", "model", "epochs", "seeds", "noise",
    "batch_size", "lr", "momentum", "weight_decay", "decays", "average", "ece_bins",
    "regression", "regression_splits", "quick",
)  # fmt: skip
_QUICK = {"dataset": "digits", "epochs": 12, "seeds": 2, "regression_splits": 3}


@dataclass
class StudyConfig:
    """Everything ``polyak study`` does is set here; every field is a ``--flag``.

    The defaults are the protocol of the README's showcase: Fashion-MNIST (10k train / 5k test),
    a BatchNorm MLP, SGD with Nesterov momentum and a cosine learning rate, 15 epochs, 3 seeds,
    0% and 40% symmetric label noise, and three averages of the weights.
    """

    dataset: str = field(
        default="auto",
        metadata={
            "help": "auto (Fashion-MNIST if installed, else digits) | fashion-mnist | digits"
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "directory of the Fashion-MNIST IDX files (implies fashion-mnist)"},
    )
    train_size: int = field(default=10_000, metadata={"help": "training images (Fashion-MNIST)"})
    test_size: int = field(default=5_000, metadata={"help": "test images (Fashion-MNIST)"})
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of the training set held out to pick the best epoch"}
    )
    model: str = field(default="mlp", metadata={"help": "mlp (BN-MLP 256-256) | cnn"})
    epochs: int = field(default=15, metadata={"help": "training epochs"})
    seeds: int = field(default=3, metadata={"help": "independent runs per noise level"})
    first_seed: int = field(
        default=0,
        metadata={"help": "runs use seeds first-seed .. first-seed+seeds-1 (and the regression "
                  "splits first-seed ..); the data split and the flipped labels stay fixed"},
    )  # fmt: skip
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
        default=False,
        metadata={"help": "a smoke run of 5-15 s: digits, 12 epochs, 2 seeds, 3 regression "
                  "splits, each unless given explicitly; not graded against the goals"},
    )  # fmt: skip
    workers: int = field(default=2, metadata={"help": "parallel training processes"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per process"})
    progress: bool = field(default=True, metadata={"help": "show progress on stderr"})

    def resolved(self) -> StudyConfig:
        """A validated copy, with ``--quick`` applied to the fields left at their defaults.

        Raises:
            ValueError: a value out of range or an unknown name; the message names the flag.
        """
        cfg = dataclasses.replace(self)
        default = StudyConfig()
        if cfg.quick:
            for name, value in _QUICK.items():
                if name == "dataset" and cfg.data_dir is not None:
                    continue  # an explicit directory asks for Fashion-MNIST (below)
                if getattr(cfg, name) == getattr(default, name):
                    setattr(cfg, name, value)
        cfg.dataset = str(cfg.dataset).strip().lower().replace("_", "-")
        if cfg.dataset == "diabetes":
            raise ValueError(
                "dataset 'diabetes' is a regression set: the study runs it as its regression "
                f"task (--regression); choose the classification set from {', '.join(DATASETS)}"
            )
        if cfg.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if cfg.data_dir is not None:
            if cfg.dataset == "digits":
                raise ValueError("--data-dir is for fashion-mnist; digits ships with scikit-learn")
            cfg.dataset = "fashion-mnist"  # an explicit directory: its files or an error
        if cfg.model not in ("mlp", "cnn"):
            raise ValueError(f"unknown model {cfg.model!r}; choose from mlp, cnn")
        if cfg.average not in ("debiased", "warmup", "constant"):
            raise ValueError(
                f"unknown average {cfg.average!r}; choose from debiased, warmup, constant"
            )
        names = ("epochs", "seeds", "batch_size", "ece_bins", "regression_splits", "workers")
        for name in (*names, "threads", "train_size", "test_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}"
                )
        if cfg.first_seed < 0:
            raise ValueError(f"--first-seed must be >= 0, got {cfg.first_seed}")
        if not 0.0 < cfg.val_fraction < 0.5:
            raise ValueError(f"--val-fraction must be in (0, 0.5), got {cfg.val_fraction}")
        if not cfg.lr > 0 or not 0 <= cfg.momentum < 1 or not cfg.weight_decay >= 0:
            raise ValueError(
                f"need --lr > 0, 0 <= --momentum < 1 and --weight-decay >= 0; got {cfg.lr}, "
                f"{cfg.momentum}, {cfg.weight_decay}"
            )
        for flag, values, lo, hi in (
            ("decays", cfg.decays, 0.0, 1.0),
            ("noise", cfg.noise, 0, 0.9),
        ):
            bad = [v for v in values if not (lo < v < hi if flag == "decays" else lo <= v < hi)]
            if bad or not values or len(set(values)) != len(values):
                interval = "(0, 1)" if flag == "decays" else "[0, 0.9)"
                raise ValueError(
                    f"--{flag} values must be distinct and in {interval}, got "
                    f"{' '.join(map(str, bad or values))}"
                )
        return cfg

    def is_default_protocol(self) -> bool:
        """The protocol the study's goals were set for (any output directory, seeds, workers)."""
        default = StudyConfig()
        return self.dataset in ("auto", "fashion-mnist") and all(
            getattr(self, f) == getattr(default, f) for f in _PROTOCOL
        )


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
