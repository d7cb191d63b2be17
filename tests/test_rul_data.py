"""The C-MAPSS reader (every malformed case has its named error), the synthetic files, and the
preprocessing (windows and capped targets against a hand-computed example, per-condition
statistics from the training units only, validation by whole units)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyak.cli.study.cmapss import (
    SENSORS,
    load_cmapss,
    read_rul_file,
    read_table,
    write_synthetic_cmapss,
)
from polyak.cli.study.data import DataError
from polyak.cli.study.rul import phm08_score
from polyak.cli.study.rul_prep import (
    capped_rul,
    constant_sensors,
    operating_conditions,
    prepare_rul,
    split_units,
    windows,
)

NASA = "Turbofan Engine Degradation Simulation Data Set"


@pytest.fixture
def fd001(tmp_path):
    paths = write_synthetic_cmapss(tmp_path, "FD001", train_units=6, test_units=4,
                                   cycles=(20, 40), seed=3)  # fmt: skip
    return tmp_path, paths


def test_synthetic_files_have_the_nasa_format_and_read_back_exactly(fd001):
    folder, paths = fd001
    first = paths["train"].read_text().splitlines()[0]
    assert first.endswith("  ") and len(first.split()) == 26
    unit, cycle, *_, s21 = first.split()
    assert (unit, cycle) == ("1", "1") and len(s21.split(".")[1]) == 4  # W32 printed to 4 places
    data = load_cmapss(folder, "FD001")
    for split in ("train", "test"):  # an independent parser agrees on every value
        np.testing.assert_array_equal(getattr(data, split), np.loadtxt(paths[split]))
    np.testing.assert_array_equal(data.rul, np.loadtxt(paths["RUL"]).astype(int))
    assert data.units("train") == 6 and data.units("test") == len(data.rul) == 4
    assert (data.rul >= 1).all() and (data.rul < 150).all()
    assert data.name == "synthetic FD001 (C-MAPSS format)"  # the generator's note says so
    (folder / "SYNTHETIC.txt").unlink()
    assert load_cmapss(folder).name == "C-MAPSS FD001"


def _corrupt(path, line, new):
    lines = path.read_text().splitlines()
    lines[line - 1] = new(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")


def _field(index, value):
    def change(line):
        fields = line.split()
        fields[index] = value
        return " ".join(fields)

    return change


# case -> (file, line to change, how, the error's words)
MALFORMED = {
    "too few columns": ("train", 3, lambda s: " ".join(s.split()[:25]),
                        "train_FD001.txt, line 3: 25 columns, expected 26"),
    "too many columns": ("test", 2, lambda s: s + " 1.0", "line 2: 27 columns, expected 26"),
    "non-numeric field": ("train", 4, _field(6, "abc"),
                          "line 4, column 7 (sensor 2 (T24)): 'abc' is not a number"),
    "not finite": ("train", 5, _field(25, "nan"), "column 26 (sensor 21 (W32)): 'nan' is not a "
                   "finite number"),
    "cycle skipped": ("train", 3, _field(1, "4"), "line 3: unit 1 goes from cycle 2 to cycle 4; "
                      "a unit's cycles must be 1, 2, 3"),
    "cycle repeated": ("test", 3, _field(1, "2"), "unit 1 goes from cycle 2 to cycle 2"),
    "fractional cycle": ("train", 2, _field(1, "1.5"), "unit 1 and cycle 1.5 must be positive "
                         "integers"),
    "unit out of order": ("train", 2, _field(0, "3"), "line 2: unit 3 follows unit 1; units must "
                          "be numbered 1, 2, 3"),
    "unit not from cycle 1": ("test", 1, _field(1, "2"), "unit 1 starts at cycle 2, not 1"),
    "blank line": ("train", 6, lambda s: "", "line 6: 0 columns, expected 26"),
    "RUL not an integer": ("RUL", 2, lambda s: "12.5", "RUL_FD001.txt, line 2: '12.5' is not a "
                           "remaining useful life"),
    "RUL negative": ("RUL", 1, lambda s: "-3", "'-3' is not a remaining useful life"),
    "RUL two values": ("RUL", 3, lambda s: "12 13", "line 3: 2 values, expected one"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_malformed_file_has_its_named_error(fd001, case):
    folder, paths = fd001
    split, line, change, words = MALFORMED[case]
    _corrupt(paths[split], line, change)
    with pytest.raises(DataError) as e:
        load_cmapss(folder, "FD001")
    assert str(paths[split]) in str(e.value) and words in str(e.value), str(e.value)


def test_missing_and_mismatched_files_are_named(fd001, tmp_path):
    folder, paths = fd001
    paths["RUL"].write_text("".join(f"{v}\n" for v in (5, 6, 7)))  # 3 values, 4 test units
    with pytest.raises(DataError, match=r"RUL_FD001.txt holds 3 values but .*test_FD001.txt has "
                       r"4 units; line i of the RUL file"):  # fmt: skip
        load_cmapss(folder)
    paths["RUL"].unlink()
    with pytest.raises(DataError, match=f"lacks RUL_FD001.txt; put .* from .*{NASA}"):
        load_cmapss(folder)
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'} does not exist; .*{NASA}"):
        load_cmapss(tmp_path / "nowhere", "FD002")
    with pytest.raises(ValueError, match="unknown C-MAPSS subset 'FD005'"):
        load_cmapss(folder, "FD005")
    paths["train"].write_text("")
    with pytest.raises(DataError, match="train_FD001.txt: file is empty"):
        read_table(paths["train"])
    paths["train"].write_bytes(b"1 1 \xff\n")
    with pytest.raises(DataError, match="not a text file"):
        read_table(paths["train"])
    paths["test"].write_text("7\n\n")  # a trailing blank line is harmless
    assert read_rul_file(paths["test"]).tolist() == [7]


def test_windows_and_capped_target_match_a_hand_computed_unit():
    """A unit of 6 cycles, one feature equal to the cycle number, window 4, cap 3."""
    x = np.arange(1.0, 7.0)[:, None]
    got = windows(x, window=4)[:, :, 0]
    assert got.tolist() == [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]]
    # remaining cycles 5 4 3 2 1 0, capped at 3; a window's target is its last cycle's
    assert capped_rul(6, cap=3).tolist() == [3, 3, 3, 2, 1, 0]
    assert capped_rul(6, cap=3)[4 - 1 :].tolist() == [2, 1, 0]
    # a unit of 2 cycles: one window, padded at the front with its first cycle
    assert windows(x[:2], window=4)[:, :, 0].tolist() == [[1, 1, 1, 2]]
    assert windows(x[:4], window=4)[:, :, 0].tolist() == [[1, 2, 3, 4]]


def test_prepare_builds_the_documented_windows_and_targets(fd001):
    folder, _ = fd001
    raw = load_cmapss(folder)
    data = prepare_rul(raw, window=10, cap=25, val_fraction=0.34)
    assert data.val_units and not set(data.val_units) & set(data.train_units)
    assert sorted(data.train_units + data.val_units) == list(range(1, 7))
    lengths = {u: int((raw.train[:, 0] == u).sum()) for u in range(1, 7)}
    # every unit of >= 10 cycles gives length - 9 windows; their targets end at 0, capped at 25
    expected = np.concatenate([capped_rul(lengths[u], 25)[9:] for u in data.train_units])
    np.testing.assert_array_equal(data.y_train, expected.astype(np.float32))
    assert data.x_train.shape == (len(expected), 10, 14) and data.x_test.shape == (4, 10, 14)
    np.testing.assert_array_equal(data.y_test, raw.rul.astype(np.float32))  # not capped
    kept = [i for i, n in enumerate(SENSORS) if f"s{i + 1} ({n})" in data.sensors]
    assert data.dropped == tuple(f"s{i} ({SENSORS[i - 1]})" for i in (1, 5, 6, 10, 16, 18, 19))
    # standardised with the training units' statistics, in float64 by hand
    fit = np.isin(raw.train[:, 0], data.train_units)
    ref = raw.train[fit][:, 5:][:, kept]
    mean, std = ref.mean(0), ref.std(0)
    last = raw.test[raw.test[:, 0] == 1][-10:, 5:][:, kept]
    np.testing.assert_allclose(data.x_test[0], (last - mean) / std, rtol=1e-5, atol=1e-5)
    assert data.padded_test_units == sum((raw.test[:, 0] == u).sum() < 10 for u in range(1, 5))


def test_statistics_come_from_the_training_units_only(fd001):
    folder, _ = fd001
    before = prepare_rul(load_cmapss(folder), val_fraction=0.34)
    # scale every sensor of the test file and of a validation unit: nothing else may change
    raw = load_cmapss(folder)
    val = before.val_units[0]
    raw.train[raw.train[:, 0] == val, 5:] *= 1.5
    raw.test[:, 5:] *= 1.5
    after = prepare_rul(raw, val_fraction=0.34)
    np.testing.assert_array_equal(after.x_train, before.x_train)
    assert not np.allclose(after.x_test, before.x_test)


def test_operating_conditions_of_fd002_are_recovered(tmp_path):
    write_synthetic_cmapss(tmp_path, "FD002", train_units=4, test_units=2, cycles=(60, 80))
    raw = load_cmapss(tmp_path, "FD002")
    train, test = operating_conditions(raw.train[:, 2:5], [raw.test[:, 2:5]], 6)
    for labels, table in ((train, raw.train), (test, raw.test)):
        altitude = np.round(table[:, 2]).astype(int)  # the six conditions differ in altitude
        pairs = set(zip(labels.tolist(), altitude.tolist()))
        assert len(pairs) == 6 == len({a for _, a in pairs}) == len({c for c, _ in pairs})
    data = prepare_rul(raw, val_fraction=0.25)
    assert data.conditions == 6 and len(data.sensors) == 14
    # each line standardised with the training units' mean and std of its own condition
    fit = np.isin(raw.train[:, 0], data.train_units)
    cond_fit, cond_test = operating_conditions(raw.train[fit, 2:5], [raw.test[:, 2:5]], 6)
    kept = [i for i, n in enumerate(SENSORS) if f"s{i + 1} ({n})" in data.sensors]
    last = np.flatnonzero(raw.test[:, 0] == 1)[-30:]
    expected = []
    for row in last:
        ref = raw.train[fit][cond_fit == cond_test[row]][:, 5:][:, kept]
        expected.append((raw.test[row, 5:][kept] - ref.mean(0)) / ref.std(0))
    expected = [expected[0]] * (30 - len(expected)) + expected  # a short unit is padded
    np.testing.assert_allclose(data.x_test[0], np.array(expected), rtol=1e-4, atol=1e-4)


def test_constant_sensors_and_unit_split():
    # constant, trending, flickering between two printed values, one level per condition
    conditions = np.repeat([0, 1, 2], 3)
    sensors = np.column_stack([np.ones(9), np.arange(9.0), np.tile([2.00, 2.01, 2.00], 3),
                               7.0 + conditions])  # fmt: skip
    assert constant_sensors(sensors, conditions).tolist() == [True, False, True, True]
    one = np.zeros(9, dtype=np.int64)  # seen as one condition, the last sensor has 3 levels
    assert constant_sensors(sensors, one).tolist() == [True, False, True, False]
    train, val = split_units(10, 0.2, seed=0)
    assert len(val) == 2 and sorted(train + val) == list(range(1, 11))
    assert split_units(10, 0.2, seed=0) == (train, val)  # fixed
    assert split_units(2, 0.49) == ([2], [1]) or split_units(2, 0.49) == ([1], [2])
    with pytest.raises(ValueError, match="--val-fraction 0.2 leaves no training unit out of 1"):
        split_units(1, 0.2)


def test_phm08_score_against_a_float64_loop():
    rng = np.random.default_rng(0)
    true = rng.integers(1, 150, size=50).astype(float)
    pred = true + rng.normal(0, 20, size=50)
    reference = 0.0
    for p, t in zip(pred.tolist(), true.tolist()):
        d = p - t
        reference += math.exp(-d / 13) - 1 if d < 0 else math.exp(d / 10) - 1
    assert phm08_score(pred, true) == pytest.approx(reference, rel=1e-12)
    assert phm08_score([10.0], [10.0]) == 0.0
    assert phm08_score([20.0], [10.0]) > phm08_score([0.0], [10.0])  # late costs more
