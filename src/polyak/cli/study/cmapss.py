"""NASA's C-MAPSS turbofan files: a strict reader, and synthetic files in the same format.

C-MAPSS ("Turbofan Engine Degradation Simulation Data Set", NASA's prognostics data repository;
Saxena, Goebel, Simon & Eklund, "Damage Propagation Modeling for Aircraft Engine Run-to-Failure
Simulation", PHM 2008) has four subsets ``FD001`` .. ``FD004``, each three text files:

* ``train_FD00k.txt``: engines (units) run to failure, one line per flight cycle;
* ``test_FD00k.txt``: other engines, their record cut off some time before failure;
* ``RUL_FD00k.txt``: one integer per line, the remaining useful life (cycles) of test unit ``i``
  after its last recorded cycle.

A line holds 26 whitespace-separated numbers: unit, cycle, 3 operating settings, 21 sensors (the
files end their lines with spaces; any whitespace is accepted). Units are numbered 1, 2, 3, ... in
file order and each unit's cycles are 1, 2, 3, ... on consecutive lines; the reader checks all of
it and names the file and the line of the first fault (:class:`polyak.cli.study.data.DataError`).

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_synthetic_cmapss(folder, "FD001", train_units=4, test_units=3, seed=0)
    >>> data = load_cmapss(folder, "FD001")
    >>> data.train.shape[1], len(data.rul), data.units("test")
    (26, 3, 3)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from polyak.cli.study.data import DataError

__all__ = [
    "COLUMNS",
    "CONDITIONS",
    "SENSORS",
    "SUBSETS",
    "CmapssData",
    "files_hint",
    "load_cmapss",
    "read_rul_file",
    "read_table",
    "write_synthetic_cmapss",
]

SUBSETS = ("FD001", "FD002", "FD003", "FD004")
CONDITIONS = {"FD001": 1, "FD002": 6, "FD003": 1, "FD004": 6}
"""Operating conditions per subset (Saxena et al. 2008, Table of the four data sets)."""

SENSORS = (
    "T2", "T24", "T30", "T50", "P2", "P15", "P30", "Nf", "Nc", "epr", "Ps30",
    "phi", "NRf", "NRc", "BPR", "farB", "htBleed", "Nf_dmd", "PCNfR_dmd", "W31", "W32",
)  # fmt: skip
"""The 21 sensors in file order (Saxena et al. 2008, Table 2); ``s1`` .. ``s21`` in reports."""

COLUMNS = ("unit", "cycle", "setting 1", "setting 2", "setting 3",
           *(f"sensor {i} ({n})" for i, n in enumerate(SENSORS, 1)))  # fmt: skip

_MARKER = "SYNTHETIC.txt"  # the generator's note: these are not NASA's files
_SOURCE = (
    'NASA\'s prognostics data repository, "Turbofan Engine Degradation Simulation Data Set" '
    "(C-MAPSS)"
)


def files_hint(subset: str) -> str:
    """What to download and where to put it, for error messages."""
    return (
        f"put train_{subset}.txt, test_{subset}.txt and RUL_{subset}.txt from {_SOURCE}, "
        "unzipped, in that directory"
    )


@dataclass(frozen=True, eq=False)
class CmapssData:
    """One subset as read: ``train`` and ``test`` are float64 ``(lines, 26)`` tables in file order,
    ``rul`` the test units' remaining useful life (int64, one per test unit, in unit order)."""

    subset: str
    train: npt.NDArray[np.float64]
    test: npt.NDArray[np.float64]
    rul: npt.NDArray[np.int64]
    directory: Path
    synthetic: bool = False  # written by write_synthetic_cmapss (its SYNTHETIC.txt is there)

    @property
    def name(self) -> str:
        """``"C-MAPSS FD001"``, or ``"synthetic FD001 (C-MAPSS format)"``."""
        if self.synthetic:
            return f"synthetic {self.subset} (C-MAPSS format)"
        return f"C-MAPSS {self.subset}"

    def units(self, split: str) -> int:
        """Number of units in ``"train"`` or ``"test"``."""
        table = self.train if split == "train" else self.test
        return int(table[-1, 0])


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file (byte {exc.start} is not ASCII)") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a final newline or blank tail is harmless
        lines.pop()
    if not lines:
        raise DataError(f"{path}: file is empty")
    return lines


def read_table(path: str | os.PathLike[str]) -> npt.NDArray[np.float64]:
    """Read a ``train_FD00k.txt`` / ``test_FD00k.txt`` file into a float64 ``(lines, 26)`` array.

    Every line must hold 26 finite numbers; units must be numbered 1, 2, ... in file order, each
    on consecutive lines, and each unit's cycles must be 1, 2, ... line after line.

    Raises:
        DataError: naming the file, the line (1-based) and the fault: a blank line, a wrong
            number of columns, a field that is not a finite number, a unit or cycle that is not a
            positive integer, a unit out of order, or cycles that are not consecutive.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "train_FD001.txt"
        >>> _ = path.write_text("1 1 " + "0 " * 24 + "\\n1 3 " + "0 " * 24 + "\\n")
        >>> read_table(path)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        DataError: .../train_FD001.txt, line 2: unit 1 goes from cycle 1 to cycle 3; ...
    """
    path = Path(path)
    rows = []
    unit, cycle = 0, 0
    for number, line in enumerate(_lines(path), 1):
        where = f"{path}, line {number}"
        fields = line.split()
        if len(fields) != len(COLUMNS):
            raise DataError(
                f"{where}: {len(fields)} columns, expected {len(COLUMNS)} (unit, cycle, 3 "
                "operating settings, 21 sensors, separated by spaces)"
            )
        try:
            row = [float(f) for f in fields]
        except ValueError:
            bad = next(i for i, f in enumerate(fields) if not _is_float(f))
            raise DataError(
                f"{where}, column {bad + 1} ({COLUMNS[bad]}): {fields[bad]!r} is not a number"
            ) from None
        if not all(math.isfinite(v) for v in row):
            bad = next(i for i, v in enumerate(row) if not math.isfinite(v))
            raise DataError(f"{where}, column {bad + 1} ({COLUMNS[bad]}): {fields[bad]!r} "
                            "is not a finite number")  # fmt: skip
        u, c = row[0], row[1]
        if u != int(u) or c != int(c) or u < 1 or c < 1:
            raise DataError(
                f"{where}: unit {fields[0]} and cycle {fields[1]} must be positive integers"
            )
        if u == unit and c != cycle + 1:
            raise DataError(
                f"{where}: unit {unit} goes from cycle {cycle} to cycle {int(c)}; a unit's "
                "cycles must be 1, 2, 3, ... on consecutive lines"
            )
        if u != unit:
            if u != unit + 1:
                raise DataError(
                    f"{where}: unit {int(u)} follows unit {unit}; units must be numbered 1, 2, "
                    "3, ... in file order, each unit's lines together"
                )
            if c != 1:
                raise DataError(f"{where}: unit {int(u)} starts at cycle {int(c)}, not 1")
        unit, cycle = int(u), int(c)
        rows.append(row)
    return np.array(rows, dtype=np.float64)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_rul_file(path: str | os.PathLike[str]) -> npt.NDArray[np.int64]:
    """Read ``RUL_FD00k.txt``: one non-negative integer per line (int64 array).

    Raises:
        DataError: naming the file and line of a blank line, a line with several values, or a
            value that is not a non-negative integer.
    """
    path = Path(path)
    values = []
    for number, line in enumerate(_lines(path), 1):
        fields = line.split()
        if len(fields) != 1:
            raise DataError(f"{path}, line {number}: {len(fields)} values, expected one "
                            "remaining useful life (cycles) per line")  # fmt: skip
        try:
            value = float(fields[0])
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0 and value == int(value)):
            raise DataError(
                f"{path}, line {number}: {fields[0]!r} is not a remaining useful life "
                "(a non-negative integer number of cycles)"
            )
        values.append(int(value))
    return np.array(values, dtype=np.int64)


def load_cmapss(data_dir: str | os.PathLike[str], subset: str = "FD001") -> CmapssData:
    """Read one subset's three files from ``data_dir`` and check that they fit together.

    Raises:
        ValueError: ``subset`` is not one of :data:`SUBSETS`.
        DataError: the directory or a file is missing (the message says where the data set comes
            from and which files go where), a file is malformed (:func:`read_table`,
            :func:`read_rul_file`), or the RUL file's length differs from the number of test
            units.
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown C-MAPSS subset {subset!r}; choose from {', '.join(SUBSETS)}")
    directory = Path(data_dir)
    paths = {k: directory / f"{k}_{subset}.txt" for k in ("train", "test", "RUL")}
    if not directory.is_dir():
        raise DataError(f"C-MAPSS directory {directory} does not exist; {files_hint(subset)}")
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"C-MAPSS directory {directory} lacks {', '.join(missing)}; "
                        f"{files_hint(subset)}")  # fmt: skip
    train, test = read_table(paths["train"]), read_table(paths["test"])
    rul = read_rul_file(paths["RUL"])
    units = int(test[-1, 0])
    if len(rul) != units:
        raise DataError(
            f"{paths['RUL']} holds {len(rul)} values but {paths['test']} has {units} units; "
            "line i of the RUL file is the remaining useful life of test unit i"
        )
    return CmapssData(subset, train, test, rul, directory, (directory / _MARKER).is_file())


# ----------------------------------------------------------------------------------------------
# Synthetic files in the same format (for tests and examples: nothing is downloaded)

# decimals of each column as NASA prints them
_DECIMALS = (0, 0, 4, 4, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 4, 2, 0, 0, 2, 2, 4)
# sensor level at condition 1, its noise (std) and its drift towards failure (0: constant);
# invented to look like the format, not NASA's statistics
_BASE = np.array([518.67, 642.5, 1590, 1408, 14.62, 21.6, 553.4, 2388.1, 9065, 1.3, 47.5,
                  521.4, 2388.1, 8143, 8.44, 0.03, 393, 2388, 100, 38.8, 23.29])  # fmt: skip
_NOISE = np.array([0, 0.5, 6, 9, 0, 0, 0.9, 0.07, 22, 0, 0.27,
                   0.74, 0.07, 19, 0.037, 0, 1.5, 0, 0, 0.18, 0.11])  # fmt: skip
_DRIFT = np.array([0, 4, 4, 4, 0, 0, -4, 4, 3, 0, 4,
                   -4, 4, 3, 4, 0, 4, 0, 0, -4, -4])  # fmt: skip
_FLICKER = 5  # sensor 6 (P15) flickers between two printed values, as in FD001
# the six operating conditions of FD002/FD004: altitude (kft), Mach number, throttle angle
_SETTINGS = np.array([[0, 0, 100], [10, 0.25, 100], [20, 0.7, 100], [25, 0.62, 60],
                      [35, 0.84, 100], [42, 0.84, 100]], dtype=float)  # fmt: skip


def _engine(length: int, cond_count: int, scale: npt.NDArray[np.float64],
            rng: np.random.Generator) -> npt.NDArray[np.float64]:  # fmt: skip
    """``length`` cycles of one engine run to failure: settings and sensors, ``(length, 24)``."""
    cond = rng.integers(cond_count, size=length)
    settings = _SETTINGS[cond] + rng.normal(0, [0.002, 0.0002, 0], size=(length, 3))
    # health falls exponentially towards failure at the last cycle, plus initial wear
    rate = rng.uniform(4.0, 7.0)
    wear = np.exp(rate * (np.arange(1, length + 1) / length - 1.0)) + rng.uniform(0, 0.1)
    sensors = scale[cond] * _BASE + np.outer(wear, _DRIFT * _NOISE)
    sensors += rng.normal(size=sensors.shape) * _NOISE
    sensors[:, _FLICKER] += 0.01 * rng.integers(2, size=length)
    return np.column_stack([settings, sensors])


def _write(path: Path, rows: list[npt.NDArray[np.float64]]) -> None:
    lines = []
    for row in np.concatenate(rows):
        cells = [f"{v:.{d}f}" if d else str(round(v)) for v, d in zip(row, _DECIMALS)]
        lines.append(" ".join(cells) + "  \n")  # NASA's lines end with two spaces
    path.write_text("".join(lines))


def write_synthetic_cmapss(
    directory: str | os.PathLike[str],
    subset: str = "FD001",
    *,
    train_units: int = 40,
    test_units: int = 20,
    cycles: tuple[int, int] = (80, 200),
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``train_/test_/RUL_<subset>.txt`` with synthetic engines, in C-MAPSS's exact format.

    Each engine lives a random number of cycles in ``cycles``. Its settings come from one
    operating condition per cycle (one for FD001/FD003, FD002/FD004's six otherwise, plus
    small noise), and each condition scales every sensor's level. Fourteen sensors drift towards
    failure as ``exp(r (t/L - 1))`` (rate ``r`` drawn per engine, ``L`` its life) plus Gaussian
    noise; six stay constant within a condition and one flickers between two printed values
    (as sensors 1, 5, 6, 10, 16, 18 and 19 do in FD001). Test engines are cut off 1 to 149
    cycles before failure (so short lives give test units shorter than 30 cycles); the RUL file
    holds the cycles they had left. A ``SYNTHETIC.txt`` note beside them makes
    :func:`load_cmapss` (and every report) call the data synthetic.

    Returns:
        ``{"train": path, "test": path, "RUL": path}``.

    Examples:
        >>> import tempfile
        >>> paths = write_synthetic_cmapss(tempfile.mkdtemp(), train_units=2, test_units=1)
        >>> len(paths["train"].read_text().splitlines()[0].split())
        26
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown C-MAPSS subset {subset!r}; choose from {', '.join(SUBSETS)}")
    lo, hi = cycles
    if not 2 <= lo <= hi or train_units < 1 or test_units < 1:
        raise ValueError(f"need 2 <= cycles[0] <= cycles[1] and >= 1 unit; got cycles={cycles}, "
                         f"train_units={train_units}, test_units={test_units}")  # fmt: skip
    rng = np.random.default_rng(seed)
    count = CONDITIONS[subset]
    scale = np.vstack([np.ones(21), rng.uniform(0.85, 1.15, size=(count - 1, 21))])
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[npt.NDArray[np.float64]]] = {"train": [], "test": []}
    remaining = []
    for split, units in (("train", train_units), ("test", test_units)):
        for unit in range(1, units + 1):
            life = int(rng.integers(lo, hi + 1))
            # test engines stop 1 to 149 cycles before failure (FD001's RUL file: 7 to 145)
            left = int(rng.integers(1, min(life, 150))) if split == "test" else 0
            seen = life - left
            if split == "test":
                remaining.append(left)
            engine = _engine(life, count, scale, rng)[:seen]
            index = np.column_stack([np.full(seen, unit), np.arange(1, seen + 1)])
            tables[split].append(np.column_stack([index, engine]))
    paths = {k: out / f"{k}_{subset}.txt" for k in ("train", "test", "RUL")}
    _write(paths["train"], tables["train"])
    _write(paths["test"], tables["test"])
    paths["RUL"].write_text("".join(f"{r} \n" for r in remaining))
    (out / _MARKER).write_text(
        "The *_FD00k.txt files here are synthetic engines in NASA's C-MAPSS format, written by "
        f"polyak.cli.study.cmapss.write_synthetic_cmapss (seed {seed}); they are not NASA's data.\n"
    )
    return paths
