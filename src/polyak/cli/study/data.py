"""Datasets for ``polyak study``: Fashion-MNIST IDX files, scikit-learn's bundled sets, label noise.

Everything here is NumPy and the standard library; scikit-learn is imported only inside the loaders
that need it. Every loader is deterministic given its ``seed``.

Example:
    >>> from polyak.cli.study.data import resolve_dataset
    >>> ds, message = resolve_dataset("auto")  # Fashion-MNIST if installed, else digits
    >>> ds.x_train.dtype, ds.task
    (dtype('float32'), 'classification')
"""

from __future__ import annotations

import gzip
import inspect
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "DataError",
    "Dataset",
    "flip_labels",
    "load_diabetes",
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
    "resolve_dataset",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts the four gzipped IDX files."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_FASHION_HINT = (
    "get the four IDX files with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) "
    "or pass --data-dir with a directory holding them (gzipped or not)"
)
# IDX type code -> big-endian NumPy dtype of the payload.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
DATASET_NAMES = ("auto", "fashion-mnist", "digits", "diabetes")


class DataError(ValueError):
    """A data file is missing, unreadable or malformed; the message names the file and the fault."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split ready for training: float32 features, int64 labels or float32 targets.

    For regression the targets are standardised with training statistics,
    ``y = (y_original - target_mean) / target_scale``, so an RMSE computed on ``y`` is reported in
    original units as ``rmse * target_scale``. For classification ``target_mean=0`` and
    ``target_scale=1``.

    Examples:
        >>> ds = load_diabetes()
        >>> rmse = float(np.sqrt(np.mean((ds.y_test - ds.y_train.mean()) ** 2)))
        >>> rmse_in_disease_progression_units = rmse * ds.target_scale
    """

    name: str
    task: str  # "classification" | "regression"
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[Any]  # int64 labels or float32 targets
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[Any]
    num_classes: int | None  # None for regression
    source: str  # where the data came from, for reports
    target_mean: float = 0.0
    target_scale: float = 1.0
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {self.task!r}")
        if (self.task == "regression") != (self.num_classes is None):
            raise ValueError(f"num_classes={self.num_classes!r} does not fit task {self.task!r}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(
                    f"{self.name}: x_{split} {x.shape} and y_{split} {y.shape} do not pair up"
                )

    @property
    def num_features(self) -> int:
        """Number of input features (columns of ``x_train``)."""
        return int(self.x_train.shape[1])


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """Read an IDX file (the MNIST format), plain or gzip-compressed, into a native-endian array.

    Compression is detected from the first two bytes, not the file name. The header is two zero
    bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32; the
    payload must hold exactly ``prod(dims)`` big-endian items, no more and no fewer.

    Args:
        path: The file to read.

    Returns:
        A writable array with the stored shape and the native-endian form of the stored dtype.

    Raises:
        DataError: The file cannot be read, is empty, truncated, oversized or not IDX.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
        >>> _ = path.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 8, 9]))  # uint8, 1-D, 3 items
        >>> read_idx(path)
        array([7, 8, 9], dtype=uint8)
    """
    name = os.fspath(path)
    try:
        raw = Path(name).read_bytes()
    except OSError as exc:
        raise DataError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{name}: corrupt or truncated gzip stream ({exc})") from exc
    if not raw:
        raise DataError(f"{name}: file is empty, expected an IDX header")
    if len(raw) < 4:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} of 4 magic bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: not an IDX file (magic starts {raw[:2].hex()}, expected 0000)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{name}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes"
        raise DataError(
            f"{name}: expected {expected} bytes of data for shape {dims} of {dtype.name}, "
            f"found {found} ({what})"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def _locate_fashion_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """Map each Fashion-MNIST file stem to an existing file (plain before .gz); list the misses."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for stem in _FASHION_FILES:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[stem] = candidate
                break
        else:
            missing.append(stem)
    return found, missing


def _subset(size: int | None, available: int, what: str, rng: np.random.Generator) -> np.ndarray:
    if size is None:
        return np.arange(available)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{what} must be a positive int or None, got {size!r}")
    if size > available:
        raise ValueError(f"{what}={size} exceeds the {available} examples available")
    return np.sort(rng.choice(available, size=int(size), replace=False))


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    train_size: int | None = 10_000,
    test_size: int | None = 5_000,
    seed: int = 0,
) -> Dataset:
    """Load fixed, seeded random subsets of Fashion-MNIST (28x28 greyscale clothing, 10 classes).

    Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) from ``data_dir``. Subsets are drawn
    uniformly without replacement (not stratified), from independent streams so the test subset
    does not depend on ``train_size``; they keep file order. Pixels become float32 in [0, 1],
    flattened to 784 features.

    Args:
        data_dir: Directory with the four files; default ``DEFAULT_FASHION_MNIST_DIR``.
        train_size: Training examples to keep (of 60000); None keeps all.
        test_size: Test examples to keep (of 10000); None keeps all.
        seed: Seed of the subset choice.

    Raises:
        DataError: Files missing, unreadable, malformed, or images and labels disagree.
        ValueError: A subset size is not a positive int or exceeds what the files hold.

    Examples:
        >>> ds = load_fashion_mnist(train_size=1000, test_size=500)  # doctest: +SKIP
        >>> ds.x_train.shape, ds.num_classes  # needs the four files  # doctest: +SKIP
        ((1000, 784), 10)
    """
    directory = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    found, missing = _locate_fashion_files(directory)
    if missing:
        where = "does not exist" if not directory.is_dir() else f"lacks {', '.join(missing)}"
        raise DataError(f"Fashion-MNIST directory {directory} {where}; {_FASHION_HINT}")
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    splits = []
    for split, size, rng in (("train", train_size, train_rng), ("t10k", test_size, test_rng)):
        image_path, label_path = (
            found[f"{split}-images-idx3-ubyte"],
            found[f"{split}-labels-idx1-ubyte"],
        )
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DataError(
                f"{image_path}: expected uint8 images of shape (N, 28, 28), "
                f"found {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DataError(
                f"{label_path}: expected uint8 labels of shape (N,), "
                f"found {labels.dtype} {labels.shape}"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{image_path} holds {len(images)} images "
                f"but {label_path} holds {len(labels)} labels"
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{label_path}: label {int(labels.max())} outside 0..9")
        keep = _subset(size, len(labels), "train_size" if split == "train" else "test_size", rng)
        x = images[keep].reshape(len(keep), -1).astype(np.float32) / np.float32(255.0)
        splits.append((x, labels[keep].astype(np.int64)))
    (x_train, y_train), (x_test, y_test) = splits
    return Dataset(
        name="fashion-mnist",
        task="classification",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        source=f"Fashion-MNIST IDX files in {directory}",
        class_names=FASHION_MNIST_CLASSES,
    )


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")


def load_digits(*, test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """Load scikit-learn's bundled digits (1797 images, 8x8, 10 classes) with a stratified split.

    Pixel intensities 0..16 are divided by 16, giving float32 features in [0, 1].

    Args:
        test_fraction: Share of examples held out for testing, in (0, 1).
        seed: Seed of the stratified split.

    Examples:
        >>> ds = load_digits()
        >>> ds.x_train.shape, ds.x_test.shape
        ((1257, 64), (540, 64))
    """
    _check_fraction(test_fraction)
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(
        name="digits",
        task="classification",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        source="scikit-learn bundled digits (sklearn.datasets.load_digits)",
        class_names=tuple(str(d) for d in range(10)),
    )


def load_diabetes(*, test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """Load scikit-learn's bundled diabetes regression (442 patients, 10 features), standardised.

    Features and target are standardised with the mean and standard deviation of the TRAINING
    split only, so no test statistic leaks into training. ``target_mean`` and ``target_scale``
    undo the target's scaling: multiply an RMSE by ``target_scale`` to report it in the original
    units (a disease-progression score).

    Args:
        test_fraction: Share of examples held out for testing, in (0, 1).
        seed: Seed of the random split.

    Examples:
        >>> ds = load_diabetes()
        >>> ds.task, ds.num_features, abs(float(ds.y_train.mean())) < 1e-6
        ('regression', 10, True)
    """
    _check_fraction(test_fraction)
    from sklearn.datasets import load_diabetes as sk_load_diabetes
    from sklearn.model_selection import train_test_split

    bunch = sk_load_diabetes(scaled=False)
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.float64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed
    )
    x_mean, x_std = x_train.mean(axis=0), x_train.std(axis=0)
    x_std[x_std == 0.0] = 1.0  # a constant feature stays 0 rather than becoming NaN
    y_mean, y_std = float(y_train.mean()), float(y_train.std())
    return Dataset(
        name="diabetes",
        task="regression",
        x_train=((x_train - x_mean) / x_std).astype(np.float32),
        y_train=((y_train - y_mean) / y_std).astype(np.float32),
        x_test=((x_test - x_mean) / x_std).astype(np.float32),
        y_test=((y_test - y_mean) / y_std).astype(np.float32),
        num_classes=None,
        source="scikit-learn bundled diabetes (sklearn.datasets.load_diabetes, raw)",
        target_mean=y_mean,
        target_scale=y_std,
    )


def _accepted(loader: Callable[..., Dataset], kw: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(loader).parameters
    return {k: v for k, v in kw.items() if k in params}


def _sizes(ds: Dataset) -> str:
    return f"{len(ds.y_train)} train / {len(ds.y_test)} test"


def resolve_dataset(
    name: str = "auto", data_dir: str | os.PathLike[str] | None = None, **kw: Any
) -> tuple[Dataset, str]:
    """Pick and load a dataset by name; return it with a one-line message for the user.

    ``"auto"`` loads Fashion-MNIST when its files are found and readable in ``data_dir`` (default
    ``DEFAULT_FASHION_MNIST_DIR``) and falls back to scikit-learn's digits otherwise; each loader
    then receives the keyword arguments it accepts (``seed`` reaches both, ``train_size`` only
    Fashion-MNIST, ``test_fraction`` only digits). An explicit ``"fashion-mnist"`` never falls back.

    Args:
        name: One of ``"auto"``, ``"fashion-mnist"``, ``"digits"``, ``"diabetes"`` (case and
            ``_``/``-`` are ignored).
        data_dir: Directory of the Fashion-MNIST IDX files.
        **kw: Passed on to the loader.

    Raises:
        ValueError: Unknown name.
        TypeError: A keyword argument no candidate loader accepts.
        DataError: ``"fashion-mnist"`` was asked for and its files are missing or malformed.

    Examples:
        >>> ds, message = resolve_dataset("digits", seed=1)
        >>> print(message)  # doctest: +ELLIPSIS
        Using digits (scikit-learn bundled, 1257 train / 540 test)...
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    directory = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    get_fashion = f"for Fashion-MNIST, {_FASHION_HINT}"
    if key == "fashion-mnist":
        ds = load_fashion_mnist(directory, **kw)
        return ds, f"Using Fashion-MNIST from {directory} ({_sizes(ds)})."
    if key == "digits":
        ds = load_digits(**kw)
        hint = f"; {get_fashion}" if _locate_fashion_files(directory)[1] else ""
        return ds, f"Using digits (scikit-learn bundled, {_sizes(ds)}){hint}."
    if key == "diabetes":
        ds = load_diabetes(**kw)
        return ds, f"Using diabetes regression (scikit-learn bundled, {_sizes(ds)})."
    unknown = set(kw) - set(inspect.signature(load_fashion_mnist).parameters)
    unknown -= set(inspect.signature(load_digits).parameters)
    if unknown:
        raise TypeError(f"resolve_dataset('auto') got unexpected arguments: {sorted(unknown)}")
    _, missing = _locate_fashion_files(directory)
    if missing:
        reason = f"Fashion-MNIST not found in {directory}"
    else:
        try:
            ds = load_fashion_mnist(directory, **_accepted(load_fashion_mnist, kw))
        except DataError as exc:
            reason = f"Fashion-MNIST in {directory} is unreadable ({exc})"
        else:
            return ds, (
                f"Using Fashion-MNIST from {directory} ({_sizes(ds)}); "
                "scikit-learn's small bundled set is available as dataset 'digits'."
            )
    ds = load_digits(**_accepted(load_digits, kw))
    return ds, f"{reason}; using digits (scikit-learn bundled, {_sizes(ds)}); {get_fashion}."


def flip_labels(
    labels: npt.ArrayLike, fraction: float, num_classes: int, seed: int | np.random.Generator
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """Add symmetric label noise: move exactly ``round(fraction * N)`` labels to another class.

    The labels to flip are chosen uniformly without replacement; each gets a class drawn uniformly
    from the ``num_classes - 1`` classes other than its own, so a flipped label never keeps its
    value. ``round`` is Python's (halves go to the even integer). The input is not modified.

    Args:
        labels: 1-D integer labels in ``0 .. num_classes - 1``.
        fraction: Share of labels to flip, in [0, 1].
        num_classes: Number of classes (at least 2 when anything is flipped).
        seed: Seed or Generator of the noise.

    Returns:
        ``(noisy_labels, flipped_mask)``: a new array of the input's dtype, and a boolean mask of
        the positions whose label was changed.

    Examples:
        >>> noisy, flipped = flip_labels(np.zeros(10, dtype=np.int64), 0.3, 10, seed=0)
        >>> int(flipped.sum()), bool((noisy[flipped] != 0).all())
        (3, True)
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}")
    count = round(fraction * y.size)
    if count and num_classes < 2:
        raise ValueError(f"cannot flip labels with num_classes={num_classes}; need at least 2")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(y.size, size=count, replace=False)
    shift = rng.integers(1, num_classes, size=count) if count else np.zeros(0, dtype=np.int64)
    noisy = y.copy()
    noisy[chosen] = (y[chosen].astype(np.int64) + shift) % num_classes
    mask = np.zeros(y.size, dtype=bool)
    mask[chosen] = True
    return noisy, mask
