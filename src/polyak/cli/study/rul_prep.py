"""The standard C-MAPSS preprocessing: from the three files to windows and remaining-life targets.

Every statistic (operating-condition centres, which sensors are constant, means and standard
deviations) is computed on the training units only; validation units (held out of the training
file, whole units, never single windows) and test units are transformed with it. The steps, in
order, each with its source, are those of :func:`prepare_rul`.

Example:
    >>> import tempfile
    >>> from polyak.cli.study.cmapss import load_cmapss, write_synthetic_cmapss
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_synthetic_cmapss(folder, train_units=10, test_units=4, seed=1)
    >>> data = prepare_rul(load_cmapss(folder), val_fraction=0.2)
    >>> data.x_test.shape, len(data.sensors)   # one window of 30 cycles x 14 sensors per unit
    ((4, 30, 14), 14)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from polyak.cli.study.cmapss import CONDITIONS, SENSORS, CmapssData

__all__ = [
    "RulData",
    "capped_rul",
    "constant_sensors",
    "operating_conditions",
    "prepare_rul",
    "split_units",
    "windows",
]

WINDOW = 30
CAP = 125

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class RulData:
    """Windows ready for training: ``x_*`` float32 ``(windows, window, sensors)``, ``y_*`` float32
    remaining useful life in cycles (capped for train and validation; the RUL file's values,
    uncapped, for test: one window per test unit, its last)."""

    subset: str
    name: str  # "C-MAPSS FD001", or "synthetic FD001 (C-MAPSS format)"
    sensors: tuple[str, ...]  # kept, e.g. "s2 (T24)"
    dropped: tuple[str, ...]
    conditions: int
    window: int
    cap: int
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.float32]
    x_val: npt.NDArray[np.float32]
    y_val: npt.NDArray[np.float32]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.float32]
    train_units: tuple[int, ...]
    val_units: tuple[int, ...]
    padded_test_units: int  # test units shorter than the window
    source: str


def capped_rul(length: int, cap: int = CAP) -> Array:
    """Piecewise-linear target of a unit run to failure after ``length`` cycles:
    ``min(length - t, cap)`` at cycle ``t = 1 .. length`` (constant while the engine is healthy,
    then falling by one per cycle to 0 at failure).

    Heimes, "Recurrent Neural Networks for Remaining Useful Life Estimation", PHM 2008 (the
    piecewise-linear target); cap 125: Li, Ding & Sun, "Remaining useful life estimation in
    prognostics using deep convolution neural networks", Reliab. Eng. Syst. Saf. 172 (2018).

    Examples:
        >>> capped_rul(5, cap=3)
        array([3., 3., 2., 1., 0.])
    """
    return np.minimum(np.arange(length - 1, -1, -1, dtype=np.float64), cap)


def windows(x: Array, window: int = WINDOW) -> Array:
    """All windows of ``window`` consecutive cycles of one unit, ``(cycles - window + 1, window,
    features)``, the i-th ending at cycle ``window + i``. A unit shorter than the window gives
    one window, padded at the front with copies of its first cycle (the earliest state seen is
    the best guess for the cycles before it); its target is that of its last cycle.

    Li, Ding & Sun (2018) use windows of 30 cycles on FD001; papers that keep 30 cycles on
    FD002/FD004, whose test sets hold shorter units, have to pad or drop those units.

    Examples:
        >>> windows(np.arange(4.0)[:, None], window=3)[:, :, 0]
        array([[0., 1., 2.],
               [1., 2., 3.]])
        >>> windows(np.arange(2.0)[:, None], window=3)[:, :, 0]
        array([[0., 0., 1.]])
    """
    if len(x) < window:
        x = np.concatenate([np.repeat(x[:1], window - len(x), axis=0), x])
    view = np.lib.stride_tricks.sliding_window_view(x, window, axis=0)  # (n, features, window)
    return np.ascontiguousarray(view.transpose(0, 2, 1))


def operating_conditions(
    train: Array, others: list[Array], count: int
) -> list[npt.NDArray[np.int64]]:
    """The operating condition of every line: k-means with ``count`` centres on the three
    settings (standardised with the training lines), fitted on ``train``, then applied to
    ``train`` and each of ``others``. With ``count == 1`` everything is condition 0.

    FD002 and FD004 were simulated under six conditions, which cluster tightly in the settings:
    Wang, Yu, Siegel & Lee, "A similarity-based prognostics approach for remaining useful life
    estimation of engineered systems", PHM 2008, identify them so and normalise per condition.
    """
    if count == 1:
        return [np.zeros(len(a), dtype=np.int64) for a in (train, *others)]
    from sklearn.cluster import KMeans

    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0
    km = KMeans(n_clusters=count, n_init=10, random_state=0).fit((train - mean) / std)
    return [km.predict((a - mean) / std).astype(np.int64) for a in (train, *others)]


def constant_sensors(sensors: Array, conditions: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which sensors carry no trend: within every operating condition they take at most two
    distinct values (constant, or flickering between two neighbouring printed values).

    Li, Ding & Sun (2018) drop sensors 1, 5, 6, 10, 16, 18 and 19 of FD001 as unchanging and
    keep the other 14; the rule is meant to make the same choice (sensor 6 moves only in its last
    printed digit). The report lists the sensors kept, so the choice can be checked on any file.

    Examples:
        >>> constant_sensors(np.array([[1, 5.0, 2], [1, 6, 2.01], [1, 7, 2]]), np.zeros(3, int))
        array([ True, False,  True])
    """
    out = np.ones(sensors.shape[1], dtype=bool)
    for c in np.unique(conditions):
        rows = sensors[conditions == c]
        out &= np.array([len(np.unique(col)) <= 2 for col in rows.T])
    return out


def split_units(units: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Hold out ``round(val_fraction * units)`` whole units (at least one) for validation:
    windows of one engine are strongly correlated, so a split by windows would validate on
    near-copies of training windows. Returns sorted ``(train units, validation units)``."""
    n_val = max(1, round(val_fraction * units))
    if n_val >= units:
        raise ValueError(
            f"--val-fraction {val_fraction} leaves no training unit out of {units}; lower it"
        )
    order = np.random.default_rng(seed).permutation(np.arange(1, units + 1))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def prepare_rul(
    raw: CmapssData,
    *,
    window: int = WINDOW,
    cap: int = CAP,
    val_fraction: float = 0.2,
    split_seed: int = 0,
) -> RulData:
    """Turn a C-MAPSS subset into training, validation and test windows.

    1. Hold out whole training units for validation (:func:`split_units`, fixed ``split_seed``).
    2. Label every line with its operating condition (:func:`operating_conditions`; six for
       FD002/FD004, one otherwise), fitted on the training units.
    3. Drop the sensors that are constant within every condition on the training units
       (:func:`constant_sensors`); the operating settings are not inputs.
    4. Standardise each kept sensor per condition, ``(x - mean_c) / std_c``, with the training
       units' statistics (z-scores, as Wang et al. 2008 normalise per operating regime).
    5. Targets: :func:`capped_rul` at every cycle of training and validation units; for test
       units the RUL file's value at their last cycle, not capped (the official answer).
    6. Windows of ``window`` cycles (:func:`windows`): all of them for training and validation,
       the last one of each test unit (the PHM08 protocol: one prediction per test unit).
    """
    train_ids, val_ids = split_units(raw.units("train"), val_fraction, split_seed)
    fit = np.isin(raw.train[:, 0], train_ids)
    fit_c, all_c, test_c = operating_conditions(
        raw.train[fit, 2:5], [raw.train[:, 2:5], raw.test[:, 2:5]], CONDITIONS[raw.subset]
    )
    drop = constant_sensors(raw.train[fit, 5:], fit_c)
    if drop.all():
        raise ValueError(f"every sensor of {raw.directory}/train_{raw.subset}.txt is constant")
    names = [f"s{i} ({n})" for i, n in enumerate(SENSORS, 1)]

    def standardised(table: Array, cond: npt.NDArray[np.int64]) -> Array:
        x = table[:, 5:][:, ~drop]
        out = np.empty_like(x)
        for c in np.unique(fit_c):
            ref = raw.train[fit, 5:][:, ~drop][fit_c == c]
            std = ref.std(0)
            std[std == 0] = 1.0
            out[cond == c] = (x[cond == c] - ref.mean(0)) / std
        return out

    train_x, test_x = standardised(raw.train, all_c), standardised(raw.test, test_c)

    def unit_windows(ids: list[int]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        xs, ys = [], []
        for u in ids:
            x = train_x[raw.train[:, 0] == u]
            xs.append(windows(x, window))
            ys.append(capped_rul(len(x), cap)[min(window, len(x)) - 1 :])
        return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32)

    x_train, y_train = unit_windows(train_ids)
    x_val, y_val = unit_windows(val_ids)
    test_units = [test_x[raw.test[:, 0] == u] for u in range(1, raw.units("test") + 1)]
    x_test = np.stack([windows(x[-window:], window)[0] for x in test_units]).astype(np.float32)
    return RulData(
        subset=raw.subset,
        name=raw.name,
        sensors=tuple(n for n, d in zip(names, drop) if not d),
        dropped=tuple(n for n, d in zip(names, drop) if d),
        conditions=CONDITIONS[raw.subset],
        window=window,
        cap=cap,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=raw.rul.astype(np.float32),
        train_units=tuple(train_ids),
        val_units=tuple(val_ids),
        padded_test_units=sum(len(x) < window for x in test_units),
        source=f"{raw.name} files in {raw.directory}",
    )
