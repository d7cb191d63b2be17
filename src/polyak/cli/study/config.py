"""The study's configuration: one dataclass whose fields are the command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DATASETS",
    "TASKS",
    "StudyConfig",
    "TrainingDiverged",
    "add_arguments",
    "config_from_args",
]

DATASETS = ("auto", "fashion-mnist", "digits")
"""Classification sets the study trains on (``auto``: Fashion-MNIST if installed, else digits)."""
TASKS = ("default", "rul")
"""``default``: classification with label noise and the diabetes regression; ``rul``: remaining
useful life on the user's NASA C-MAPSS files (:mod:`polyak.cli.study.rul`)."""


class TrainingDiverged(ValueError):
    """A training run of the study met an inf/nan loss (a learning rate too large for the
    model): the study stops there, and the command says so in one line."""

    @classmethod
    def at(cls, loss: float, epoch: int, seed: int, lr: float, what: str) -> TrainingDiverged:
        return cls(
            f"training diverged: the loss of {what} (seed {seed}) became {loss} in epoch "
            f"{epoch}; lower --lr (it is {lr:g})"
        )


# Fields that define the protocol the goals were set for (the rest only say where and how fast).
_PROTOCOL = (
    "task", "train_size", "test_size", "val_fraction", "model", "epochs", "seeds", "noise",
    "batch_size", "lr", "momentum", "weight_decay", "decays", "average", "ece_bins",
    "regression", "regression_splits", "quick",
)  # fmt: skip
_QUICK = {"dataset": "digits", "epochs": 12, "seeds": 2, "regression_splits": 3}
# --task rul: its own defaults for the fields left at theirs; the fields it has no use for
_RUL = {"epochs": 60, "seeds": 5, "batch_size": 256, "lr": 1e-3, "val_fraction": 0.2}
_RUL_QUICK = {"epochs": 8, "seeds": 2, "patience": 3}
_NOT_RUL = ("dataset", "train_size", "test_size", "model", "noise", "momentum", "weight_decay",
            "decays", "average", "ece_bins", "regression", "regression_splits",
            "posthoc", "methods", "merge")  # fmt: skip
_ONLY_RUL = ("subset", "patience")


@dataclass
class StudyConfig:
    """Everything ``polyak study`` does is set here; every field is a ``--flag``.

    The defaults are the protocol of the README's showcase: Fashion-MNIST (10k train / 5k test),
    a BatchNorm MLP, SGD with Nesterov momentum and a cosine learning rate, 15 epochs, 3 seeds,
    0% and 40% symmetric label noise, and three averages of the weights. ``task="rul"`` runs
    remaining-useful-life regression on C-MAPSS files instead, with its own defaults.
    """

    task: str = field(
        default="default",
        metadata={"help": "default (label noise on Fashion-MNIST/digits, diabetes regression) | "
                  "rul (remaining useful life on NASA's C-MAPSS files in --data-dir; its own "
                  "defaults: --epochs 60 --seeds 5 --batch-size 256 --lr 0.001 "
                  "--val-fraction 0.2)"},
    )  # fmt: skip
    subset: str = field(
        default="FD001", metadata={"help": "C-MAPSS subset FD001 .. FD004 (--task rul)"}
    )
    patience: int = field(
        default=10,
        metadata={"help": "--task rul: stop once every candidate (live weights, each average) "
                  "went this many epochs without a better validation RMSE"},
    )  # fmt: skip
    dataset: str = field(
        default="auto",
        metadata={
            "help": "auto (Fashion-MNIST if installed, else digits) | fashion-mnist | digits"
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "directory of the Fashion-MNIST IDX files (implies fashion-mnist); "
                  "with --task rul, of the C-MAPSS text files"},
    )  # fmt: skip
    train_size: int = field(default=10_000, metadata={"help": "training images (Fashion-MNIST)"})
    test_size: int = field(default=5_000, metadata={"help": "test images (Fashion-MNIST)"})
    val_fraction: float = field(
        default=0.1,
        metadata={
            "help": "share of the training set held out to pick the best epoch (--task "
            "rul: of the training units)"
        },
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
    posthoc: bool = field(
        default=True,
        metadata={"help": "also keep EDM2's post-hoc EMA in each classification run (power "
                  "averages of sigma_rel 0.05, 0.10 and 0.20, a snapshot every half epoch) and, "
                  "after training, sweep sigma_rel 0.01-0.28 by reconstruction"},
    )  # fmt: skip
    methods: bool = field(
        default=True,
        metadata={"help": "also compare BEMA, SWAG (K=10, 8 draws) and write-back (Switch EMA, "
                  "PMA-style restarts; runs of their own) with the plain EMA, each chosen on "
                  "the validation split"},
    )  # fmt: skip
    merge: bool = field(
        default=True,
        metadata={"help": "also train each seed with a constant learning rate and with a decay "
                  "over its last 20%% of steps, and merge the constant run's checkpoints "
                  "(WSM, LAWA, EMA-equivalent weights) instead of decaying"},
    )  # fmt: skip
    out: str = field(default="polyak-study", metadata={"help": "output directory"})
    quick: bool = field(
        default=False,
        metadata={"help": "a smoke run of 5-15 s: digits, 12 epochs, 2 seeds, 3 regression "
                  "splits, each unless given explicitly; not graded against the goals"},
    )  # fmt: skip
    workers: int = field(default=2, metadata={"help": "parallel training processes"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per process"})
    progress: bool = field(default=True, metadata={"help": "show progress on stderr"})
    given: tuple[str, ...] = field(default=(), metadata={"cli": False})
    """Fields set on purpose: ``--quick`` and ``--task rul`` keep them even when they equal the
    study's default (the command line fills this in; a field differing from it counts anyway)."""

    def _left(self, name: str) -> bool:
        """Field ``name`` was neither given nor changed from the study's default."""
        return name not in self.given and getattr(self, name) == getattr(StudyConfig(), name)

    def resolved(self) -> StudyConfig:
        """A validated copy, with ``--quick`` (and ``--task rul``) applied to the fields left at
        their defaults.

        Raises:
            ValueError: a value out of range or an unknown name; the message names the flag.
        """
        cfg = dataclasses.replace(self)
        if cfg.task not in TASKS:
            raise ValueError(f"unknown task {cfg.task!r}; choose from {', '.join(TASKS)}")
        if cfg.task == "rul":
            return _resolved_rul(cfg)
        for name in _ONLY_RUL:
            if not cfg._left(name):
                raise ValueError(f"--{name} is for --task rul")
        if cfg.quick:
            for name, value in _QUICK.items():
                if name == "dataset" and cfg.data_dir is not None:
                    continue  # an explicit directory asks for Fashion-MNIST (below)
                if cfg._left(name):
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
        _check_common(cfg, (*names, "threads", "train_size", "test_size"))
        if not 0 <= cfg.momentum < 1 or not cfg.weight_decay >= 0:
            raise ValueError(
                f"need 0 <= --momentum < 1 and --weight-decay >= 0; got {cfg.momentum}, "
                f"{cfg.weight_decay}"
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


def _check_common(cfg: StudyConfig, counts: tuple[str, ...]) -> None:
    for name in counts:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.first_seed < 0:
        raise ValueError(f"--first-seed must be >= 0, got {cfg.first_seed}")
    if not 0.0 < cfg.val_fraction < 0.5:
        raise ValueError(f"--val-fraction must be in (0, 0.5), got {cfg.val_fraction}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")


def _resolved_rul(cfg: StudyConfig) -> StudyConfig:
    """``--task rul``: its defaults (and ``--quick``'s) for the fields left at theirs; a field
    it has no use for, or a missing ``--data-dir``, is an error."""
    from polyak.cli.study.cmapss import SUBSETS, files_hint

    for name in _NOT_RUL:
        if not cfg._left(name):
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --task rul")
    for name, value in {**_RUL, **(_RUL_QUICK if cfg.quick else {})}.items():
        if cfg._left(name):
            setattr(cfg, name, value)
    cfg.subset = str(cfg.subset).strip().upper()
    if cfg.subset not in SUBSETS:
        raise ValueError(f"unknown --subset {cfg.subset!r}; choose from {', '.join(SUBSETS)}")
    if cfg.data_dir is None:
        raise ValueError(f"--task rul needs --data-dir DIR: {files_hint(cfg.subset)}")
    _check_common(cfg, ("epochs", "seeds", "batch_size", "patience", "workers", "threads"))
    return cfg


def _finite_float(text: str) -> float:
    """A float flag's value: a finite number (``inf`` and ``nan`` parse as floats but no flag
    of the study means anything with them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per :class:`StudyConfig` field. A flag not given is left out of the
    parsed arguments (the dataclass holds the defaults), so that :func:`config_from_args` knows
    which were given."""
    for f in dataclasses.fields(StudyConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        default: Any = f.default
        helptext = f.metadata.get("help", "")
        kw: dict[str, Any] = {"default": argparse.SUPPRESS}
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif str(f.type).startswith("tuple"):
            kw.update(type=_finite_float, nargs="+")
            default = " ".join(map(str, default))
        else:
            kw["type"] = {"int": int, "float": _finite_float}.get(str(f.type).split(" ")[0], str)
        parser.add_argument(flag, help=f"{helptext} (default: {default})", **kw)


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` of parsed arguments (see :func:`add_arguments`); the flags given
    are recorded in :attr:`StudyConfig.given`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)
              if hasattr(args, f.name)}  # fmt: skip
    for name in ("noise", "decays"):
        if name in values:
            values[name] = tuple(values[name])
    return StudyConfig(**values, given=tuple(values))
