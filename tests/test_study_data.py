"""Tests of polyak.cli.study.data: IDX reading, dataset loaders, resolution and label noise."""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from polyak.cli.study.data import (
    DATASET_NAMES,
    DEFAULT_FASHION_MNIST_DIR,
    DataError,
    Dataset,
    flip_labels,
    load_diabetes,
    load_digits,
    load_fashion_mnist,
    read_idx,
    resolve_dataset,
)

CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}
FASHION_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as IDX by hand (independently of the reader)."""
    head = struct.pack(">BBBB", 0, 0, CODES[array.dtype.type], array.ndim)
    head += struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("dtype", list(CODES))
def test_read_idx_round_trips_every_type(tmp_path, dtype, gz):
    values = np.array([[0, 1, 2], [3, 100, 127]], dtype=dtype)
    if np.issubdtype(dtype, np.signedinteger):
        values[0, 0] = -128 if dtype is np.int8 else -300
    if np.issubdtype(dtype, np.floating):
        values = values / 7 - 0.5  # fractional values expose byte-order mistakes
        values = values.astype(dtype)
    path = write(tmp_path / "a.idx", idx_bytes(values), gz)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype)  # native byte order
    assert out.dtype.isnative
    assert out.shape == values.shape
    np.testing.assert_array_equal(out, values)
    out[0, 0] = 1  # writable, not a view of an immutable buffer


def test_read_idx_detects_gzip_by_magic_not_suffix(tmp_path):
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    plain_named_gz = write(tmp_path / "plain.gz", idx_bytes(values))
    gzip_named_plain = write(tmp_path / "zipped-idx3-ubyte", idx_bytes(values), gz=True)
    np.testing.assert_array_equal(read_idx(plain_named_gz), values)
    np.testing.assert_array_equal(read_idx(str(gzip_named_plain)), values)


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(list(CODES)).map(np.dtype),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": False},
    ),
    gz=st.booleans(),
)
def test_read_idx_round_trip_property(array, gz):
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "x", idx_bytes(array), gz)
        out = read_idx(path)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def _good() -> bytes:
    return idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


BAD_FILES = {
    "empty": (b"", False, "empty"),
    "empty-gzip": (b"", True, "empty"),
    "short-magic": (b"\x00\x00\x08", False, "truncated IDX header"),
    "truncated-dims": (_good()[:9], False, "truncated IDX header"),
    "truncated-payload": (_good()[:-1], False, "expected 24 bytes of data for shape (2, 3, 4)"),
    "truncated-payload-gzip": (_good()[:-5], True, "found 19 (truncated)"),
    "extra-bytes": (_good() + b"\x00", False, "found 25 (trailing bytes)"),
    "bad-magic": (b"\x01" + _good()[1:], False, "not an IDX file"),
    "unknown-type": (_good()[:2] + b"\x0a" + _good()[3:], False, "unknown IDX type code 0x0a"),
    "zero-dims": (b"\x00\x00\x08\x00\x05", False, "0 dimensions"),
    "text": (b"hello, world\n", False, "not an IDX file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_read_idx_rejects_malformed_files_naming_them(tmp_path, case):
    payload, gz, fragment = BAD_FILES[case]
    path = write(tmp_path / f"{case}-idx", payload, gz)
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_read_idx_rejects_corrupt_and_truncated_gzip(tmp_path):
    stream = gzip.compress(_good())
    cut = write(tmp_path / "cut.gz", stream[: len(stream) // 2])
    garbled = write(tmp_path / "garbled.gz", stream[:10] + b"\xff" * 8 + stream[18:])
    for path in (cut, garbled):
        with pytest.raises(DataError, match="gzip") as info:
            read_idx(path)
        assert str(path) in str(info.value)


def test_read_idx_missing_file_is_a_data_error(tmp_path):
    path = tmp_path / "nowhere-idx1-ubyte"
    with pytest.raises(DataError, match="cannot read") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- Dataset


def test_dataset_validates_its_fields():
    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int64)
    Dataset("ok", "classification", x, y, x, y, num_classes=2, source="test")
    with pytest.raises(ValueError, match="task"):
        Dataset("bad", "ranking", x, y, x, y, num_classes=2, source="test")
    with pytest.raises(ValueError, match="num_classes"):
        Dataset("bad", "regression", x, y, x, y, num_classes=2, source="test")
    with pytest.raises(ValueError, match="y_test"):
        Dataset("bad", "classification", x, y, x, y[:3], num_classes=2, source="test")


# --------------------------------------------------------------------------- flip_labels


def test_flip_labels_exact_count_other_class_and_mask():
    labels = np.arange(1000, dtype=np.int64) % 7
    before = labels.copy()
    noisy, mask = flip_labels(labels, 0.37, 7, seed=3)
    assert mask.dtype == bool and mask.sum() == 370
    assert np.all(noisy[mask] != labels[mask])
    np.testing.assert_array_equal(noisy[~mask], labels[~mask])
    assert noisy.min() >= 0 and noisy.max() < 7 and noisy.dtype == labels.dtype
    np.testing.assert_array_equal(labels, before)


def test_flip_labels_is_seeded():
    labels = np.arange(500) % 10
    a, mask_a = flip_labels(labels, 0.2, 10, seed=1)
    b, mask_b = flip_labels(labels, 0.2, 10, seed=1)
    _, mask_c = flip_labels(labels, 0.2, 10, seed=2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert not np.array_equal(mask_a, mask_c)
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(
        flip_labels(labels, 0.5, 10, g1)[0], flip_labels(labels, 0.5, 10, g2)[0]
    )


def test_flip_labels_targets_and_positions_are_roughly_uniform():
    n, k = 18_000, 10
    labels = np.full(n, 4, dtype=np.int64)
    noisy, mask = flip_labels(labels, 1.0, k, seed=0)
    counts = np.bincount(noisy, minlength=k)
    assert counts[4] == 0
    expected = n / (k - 1)
    sd = np.sqrt(n * (1 / (k - 1)) * (1 - 1 / (k - 1)))
    others = np.delete(counts, 4)
    assert np.all(np.abs(others - expected) < 5 * sd), counts
    # Positions: flipping half of a long array should hit each tenth about equally often.
    _, mask = flip_labels(np.zeros(20_000, dtype=np.int64), 0.5, 3, seed=1)
    per_block = mask.reshape(10, -1).sum(axis=1)
    assert np.all(np.abs(per_block - 1000) < 5 * np.sqrt(2000 * 0.25)), per_block


def test_flip_labels_edges():
    labels = np.array([0, 1, 2, 1], dtype=np.int32)
    noisy, mask = flip_labels(labels, 0.0, 3, seed=0)
    np.testing.assert_array_equal(noisy, labels)
    assert not mask.any() and noisy is not labels
    assert flip_labels(np.arange(10) % 2, 0.25, 2, seed=0)[1].sum() == 2  # round(2.5) == 2
    assert flip_labels(np.arange(10) % 2, 0.75, 2, seed=0)[1].sum() == 8  # round(7.5) == 8
    noisy, mask = flip_labels(np.arange(10) % 2, 1.0, 2, seed=0)  # two classes: flip is forced
    np.testing.assert_array_equal(noisy, 1 - np.arange(10) % 2)
    assert flip_labels(np.zeros(0, dtype=np.int64), 0.5, 3, seed=0)[0].shape == (0,)
    assert flip_labels([0, 0, 0], 0.0, 1, seed=0)[1].sum() == 0
    with pytest.raises(ValueError, match="num_classes=1"):
        flip_labels([0, 0, 0], 0.5, 1, seed=0)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        flip_labels([0, 3], 0.5, 3, seed=0)
    with pytest.raises(ValueError, match="1-D integer"):
        flip_labels([0.0, 1.0], 0.5, 3, seed=0)


@given(
    fraction=st.one_of(
        st.floats(max_value=-1e-12), st.floats(min_value=1 + 1e-12), st.just(float("nan"))
    )
)
def test_flip_labels_rejects_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match="fraction"):
        flip_labels(np.arange(10) % 3, fraction, 3, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 200),
    num_classes=st.integers(2, 12),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_flip_labels_property(data, n, num_classes, fraction, seed):
    labels = data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, num_classes - 1)))
    before = labels.copy()
    noisy, mask = flip_labels(labels, fraction, num_classes, seed)
    assert int(mask.sum()) == round(fraction * n)
    np.testing.assert_array_equal(noisy != labels, mask)  # changed exactly where flagged
    assert n == 0 or (noisy.min() >= 0 and noisy.max() < num_classes)
    np.testing.assert_array_equal(labels, before)
    again, _ = flip_labels(labels, fraction, num_classes, seed)
    np.testing.assert_array_equal(noisy, again)


# --------------------------------------------------------------------------- sklearn sets


def _sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


def test_load_digits_shapes_range_partition_and_stratification():
    from sklearn.datasets import load_digits as sk_digits

    ds = load_digits()
    assert (ds.name, ds.task, ds.num_classes) == ("digits", "classification", 10)
    assert ds.x_train.shape == (1257, 64) and ds.x_test.shape == (540, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # Train + test is exactly the full set: disjoint, nothing lost (rows with label appended).
    full = sk_digits()
    both = np.vstack(
        [
            np.column_stack([ds.x_train * 16, ds.y_train]),
            np.column_stack([ds.x_test * 16, ds.y_test]),
        ]
    )
    np.testing.assert_array_equal(
        _sorted_rows(both), _sorted_rows(np.column_stack([full.data, full.target]))
    )
    expected = np.bincount(full.target) * 540 / 1797
    assert np.all(np.abs(np.bincount(ds.y_test) - expected) <= 1)


def test_load_digits_is_seeded_and_validates_fraction():
    a, b, c = load_digits(seed=4), load_digits(seed=4), load_digits(seed=5)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert load_digits(test_fraction=0.5).x_test.shape[0] in (898, 899)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_load_diabetes_standardises_with_train_statistics_only():
    from sklearn.datasets import load_diabetes as sk_diabetes

    ds = load_diabetes(seed=0)
    assert (ds.task, ds.num_classes, ds.num_features) == ("regression", None, 10)
    assert ds.x_train.shape == (309, 10) and ds.x_test.shape == (133, 10)
    assert ds.y_train.dtype == np.float32 and ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1, atol=1e-5)
    assert abs(float(ds.y_train.mean())) < 1e-5 and abs(float(ds.y_train.std()) - 1) < 1e-5
    # The test split was scaled with train statistics, not its own.
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-2
    test_mean, test_std = float(ds.y_test.mean()), float(ds.y_test.std())
    assert abs(test_mean) > 1e-5 or abs(test_std - 1) > 1e-3
    # target_mean / target_scale undo the scaling into the original, integer-valued targets, and
    # they are the train split's statistics (not the full data's).
    raw = sk_diabetes(scaled=False).target
    y_train = ds.y_train.astype(np.float64) * ds.target_scale + ds.target_mean
    y_test = ds.y_test.astype(np.float64) * ds.target_scale + ds.target_mean
    np.testing.assert_allclose(y_test, np.round(y_test), atol=1e-3)
    np.testing.assert_array_equal(
        np.sort(np.round(np.concatenate([y_train, y_test]))), np.sort(raw)
    )
    assert ds.target_mean == pytest.approx(y_train.mean(), rel=1e-6)
    assert ds.target_scale == pytest.approx(y_train.std(), rel=1e-5)
    assert abs(ds.target_mean - raw.mean()) > 1e-3  # the full data's mean would be a leak
    other = load_diabetes(seed=1)
    assert not np.array_equal(other.y_train, ds.y_train)
    np.testing.assert_array_equal(load_diabetes(seed=1).x_test, other.x_test)


# --------------------------------------------------------------------------- Fashion-MNIST

REAL_FILES_PRESENT = all(
    (DEFAULT_FASHION_MNIST_DIR / s).is_file() or (DEFAULT_FASHION_MNIST_DIR / f"{s}.gz").is_file()
    for s in FASHION_STEMS
)


@pytest.mark.skipif(
    not REAL_FILES_PRESENT,
    reason=f"no Fashion-MNIST in {DEFAULT_FASHION_MNIST_DIR} (apt-get install it)",
)
def test_load_fashion_mnist_real_files():
    ds = load_fashion_mnist()
    assert (ds.name, ds.task, ds.num_classes) == ("fashion-mnist", "classification", 10)
    assert ds.x_train.shape == (10_000, 784) and ds.x_test.shape == (5_000, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert 0.2 < float(ds.x_test.mean()) < 0.4  # Fashion-MNIST's mean intensity is about 0.29
    assert set(np.unique(ds.y_train)) == set(range(10)) == set(np.unique(ds.y_test))
    assert len(ds.class_names or ()) == 10
    assert str(DEFAULT_FASHION_MNIST_DIR) in ds.source


def make_fake_fashion(
    directory: Path, n_train: int = 60, n_test: int = 30, gz: bool = True
) -> Path:
    """Tiny Fashion-MNIST look-alike: image i is filled with the value i, its label is i % 10."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28)).copy()
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz and split == "train" else ""  # mix plain and gzipped files
        write(directory / f"{split}-images-idx3-ubyte{suffix}", idx_bytes(images), gz=bool(suffix))
        write(directory / f"{split}-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz=bool(suffix))
    return directory


def test_load_fashion_mnist_fake_dir_keeps_images_and_labels_paired(tmp_path):
    fake = make_fake_fashion(tmp_path / "fm")
    ds = load_fashion_mnist(fake, train_size=20, test_size=10, seed=7)
    assert ds.x_train.shape == (20, 784) and ds.x_test.shape == (10, 784)
    for x, y, n in ((ds.x_train, ds.y_train, 60), (ds.x_test, ds.y_test, 30)):
        assert np.all(x == x[:, :1])  # whole rows came from one image each
        index = np.round(x[:, 0] * 255).astype(np.int64)
        np.testing.assert_allclose(x[:, 0], index / 255, rtol=1e-6)
        assert len(set(index)) == len(index) and index.max() < n  # without replacement
        np.testing.assert_array_equal(y, index % 10)
    assert ds.x_train.max() <= 1.0 and ds.x_train.min() >= 0.0
    full = load_fashion_mnist(fake, train_size=None, test_size=None)
    assert full.x_train.shape == (60, 784) and full.x_train[-1, 0] == np.float32(59 / 255)


def test_load_fashion_mnist_subsets_are_seeded_and_independent(tmp_path):
    fake = make_fake_fashion(tmp_path / "fm", gz=False)
    a = load_fashion_mnist(fake, train_size=20, test_size=10, seed=1)
    b = load_fashion_mnist(fake, train_size=20, test_size=10, seed=1)
    c = load_fashion_mnist(fake, train_size=20, test_size=10, seed=2)
    d = load_fashion_mnist(fake, train_size=40, test_size=10, seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    np.testing.assert_array_equal(a.x_test, d.x_test)  # test subset ignores train_size
    with pytest.raises(ValueError, match="train_size=61"):
        load_fashion_mnist(fake, train_size=61)
    with pytest.raises(ValueError, match="test_size"):
        load_fashion_mnist(fake, train_size=5, test_size=0)


def test_load_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    fake = make_fake_fashion(tmp_path / "fm")
    (fake / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as info:
        load_fashion_mnist(fake)
    message = str(info.value)
    assert str(fake) in message and "t10k-labels-idx1-ubyte" in message
    assert "train-images" not in message  # only the missing file is listed
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    with pytest.raises(DataError, match="does not exist"):
        load_fashion_mnist(tmp_path / "absent")


def test_load_fashion_mnist_rejects_inconsistent_files(tmp_path):
    fake = make_fake_fashion(tmp_path / "fm", gz=False)
    labels = fake / "t10k-labels-idx1-ubyte"
    write(labels, idx_bytes(np.zeros(29, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"30 images but .* 29 labels") as info:
        load_fashion_mnist(fake, train_size=5, test_size=5)
    assert str(labels) in str(info.value)
    write(labels, idx_bytes(np.full(30, 10, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"label 10 outside 0\.\.9"):
        load_fashion_mnist(fake, train_size=5, test_size=5)
    write(fake / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((30, 27, 27), dtype=np.uint8)))
    with pytest.raises(DataError, match=r"\(N, 28, 28\)"):
        load_fashion_mnist(fake, train_size=5, test_size=5)


# --------------------------------------------------------------------------- resolve_dataset


def test_resolve_auto_falls_back_to_digits_when_dir_is_empty(tmp_path):
    ds, message = resolve_dataset("auto", tmp_path, seed=0, train_size=5)  # train_size: FM only
    assert ds.name == "digits" and ds.x_train.shape == (1257, 64)
    assert "\n" not in message
    assert "not found" in message and str(tmp_path) in message and "digits" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def test_resolve_auto_uses_fashion_mnist_when_present(tmp_path):
    fake = make_fake_fashion(tmp_path / "fm")
    ds, message = resolve_dataset("auto", fake, train_size=10, test_size=5, test_fraction=0.5)
    assert ds.name == "fashion-mnist" and ds.x_train.shape == (10, 784)
    assert "\n" not in message and "Fashion-MNIST" in message and str(fake) in message
    assert "digits" in message


def test_resolve_auto_falls_back_when_files_are_corrupt(tmp_path):
    fake = make_fake_fashion(tmp_path / "fm", gz=False)
    images = fake / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    ds, message = resolve_dataset("auto", fake)
    assert ds.name == "digits"
    assert "unreadable" in message and "truncated" in message and "\n" not in message
    with pytest.raises(DataError, match="truncated"):
        resolve_dataset("fashion-mnist", fake)


def test_resolve_explicit_names(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        resolve_dataset("fashion-mnist", tmp_path)  # no silent fallback
    fake = make_fake_fashion(tmp_path / "fm")
    assert resolve_dataset("Fashion_MNIST", fake, train_size=5, test_size=5)[0].x_train.shape == (
        5,
        784,
    )
    ds, message = resolve_dataset("diabetes", seed=2)
    assert ds.task == "regression" and "diabetes" in message
    ds, message = resolve_dataset("digits", tmp_path)
    assert ds.name == "digits" and "apt-get install dataset-fashion-mnist" in message
    _, message = resolve_dataset("digits", fake)  # installed: no advice to install it
    assert "Fashion-MNIST" not in message and "apt-get" not in message
    with pytest.raises(ValueError, match="unknown dataset 'cifar'") as info:
        resolve_dataset("cifar")
    assert all(name in str(info.value) for name in DATASET_NAMES)
    with pytest.raises(TypeError):
        resolve_dataset("digits", train_size=5)
    with pytest.raises(TypeError, match="batch_size"):
        resolve_dataset("auto", tmp_path, batch_size=5)
