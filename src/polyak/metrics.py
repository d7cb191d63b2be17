"""Evaluation metrics for comparing live and averaged weights (NumPy only).

Every function accepts anything :func:`numpy.asarray` takes (lists, arrays, CPU torch tensors,
tensors that require grad), computes in float64 and returns a Python ``float`` (or a float64 array).
Classification inputs are ``(N, C)`` rows (scores, probabilities or logits) with ``(N,)`` integer
labels in ``0..C-1``. Bad input raises ``ValueError``/``TypeError`` naming the value and the shapes.

References used below: Guo et al. (2017), "On Calibration of Modern Neural Networks", ICML;
Nixon et al. (2019), "Measuring Calibration in Deep Learning", CVPR Workshops; Bhojanapalli et al.
(2021), "On the Reproducibility of Neural Network Predictions", arXiv:2102.03349; Morales-Brotons,
Vogels & Hendrikx (2024), "Exponential Moving Average of Weights in Deep Learning: Dynamics and
Benefits", TMLR, whose churn, JS-divergence and equal-mass ECE these functions reproduce.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "CalibrationBins",
    "accuracy",
    "agreement",
    "calibration_bins",
    "churn",
    "ece",
    "js_divergence",
    "log_softmax",
    "mae",
    "nll",
    "nll_from_logits",
    "rmse",
    "softmax",
]

_SUM_TOL = 1e-3
_Floats = NDArray[np.float64]


def _array(x: Any, name: str, kinds: str = "iuf") -> NDArray[Any]:
    if callable(getattr(x, "detach", None)):  # torch tensor: duck-typed so torch is never imported
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            x = x.float()
    a = np.asarray(x)
    if a.dtype.kind not in kinds:
        want = "an integer" if kinds == "iu" else "a real numeric"
        raise TypeError(f"{name} must have {want} dtype, got dtype {a.dtype} (shape {a.shape})")
    return a


def _where(mask: NDArray[np.bool_]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _floats(x: Any, name: str, ndim: int | None = None) -> _Floats:
    a = _array(x, name).astype(np.float64)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if ndim is not None and 0 in a.shape:
        raise ValueError(f"{name} is empty (N=0 or C=0, shape {a.shape}); the metric is undefined")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN at index {_where(np.isnan(a))} (shape {a.shape})")
    return a


def _probs(probs: Any, name: str = "probs") -> _Floats:
    p = _floats(probs, name, ndim=2)
    if not np.isfinite(p).all() or (p < 0).any():
        bad = _where(~np.isfinite(p) | (p < 0))
        raise ValueError(f"{name} must be finite and >= 0; {name}[{bad}] = {p[bad]} ({p.shape})")
    dev = np.abs(p.sum(axis=1) - 1.0)
    if (dev > _SUM_TOL).any():
        row = int(np.argmax(dev))
        raise ValueError(
            f"{name} rows must sum to 1 (tolerance {_SUM_TOL}); row {row} sums to "
            f"{float(p[row].sum())!r} ({name} shape {p.shape}). Pass softmax(logits) first."
        )
    return p


def _labels(labels: Any, n: int, n_classes: int | None, ref: str) -> NDArray[np.int64]:
    y = _array(labels, "labels", kinds="iu")
    if y.shape != (n,):
        raise ValueError(f"labels shape {y.shape} does not match {ref}; want ({n},)")
    hi = n_classes if n_classes is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((y < 0) | (y >= hi))
    if bad.size:
        valid = f"0..{hi - 1} for {n_classes} classes" if n_classes is not None else ">= 0"
        raise ValueError(f"labels[{bad[0]}] = {y[bad[0]]} is out of range ({valid}; {ref})")
    return y.astype(np.int64)


def _top1(pred: Any, name: str) -> tuple[NDArray[np.int64], int | None, tuple[int, ...]]:
    """Class indices from (N, C) scores (first maximum wins ties) or (N,) indices; C; shape."""
    a = _array(pred, name)
    if a.ndim == 2:
        return np.argmax(_floats(a, name, ndim=2), axis=1).astype(np.int64), a.shape[1], a.shape
    if a.ndim == 1:
        if a.dtype.kind not in "iu":
            raise TypeError(f"1-D {name} must hold integer class indices, got dtype {a.dtype}")
        if a.size == 0:
            raise ValueError(f"{name} is empty (N=0, shape {a.shape}); the metric is undefined")
        return a.astype(np.int64), None, a.shape
    raise ValueError(f"{name} must be (N, C) scores or (N,) class indices, got shape {a.shape}")


def log_softmax(logits: ArrayLike, axis: int = -1) -> _Floats:
    """Numerically stable ``log_softmax(x)_i = (x_i - max x) - log sum_j exp(x_j - max x)``.

    Subtracting the maximum makes every exponent <= 0, so nothing overflows, and the result stays
    exact where ``log(softmax(x))`` would give ``-inf`` (Goodfellow, Bengio & Courville 2016,
    *Deep Learning*, section 4.1). ``-inf`` entries are allowed (probability 0); NaN, ``+inf`` or an
    all ``-inf`` slice raise ``ValueError``. Returns float64.

    >>> log_softmax([0.0, 1000.0]).tolist()
    [-1000.0, 0.0]
    """
    x = _array(logits, "logits").astype(np.float64)
    if x.size == 0:
        return x
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError(f"logits must not contain NaN or +inf (shape {x.shape})")
    m = np.max(x, axis=axis, keepdims=True)
    if np.isneginf(m).any():
        raise ValueError(f"logits has a slice along axis {axis} that is all -inf (shape {x.shape})")
    with np.errstate(over="ignore"):  # finite - huge may round to -inf, whose exp is exactly 0
        z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def softmax(logits: ArrayLike, axis: int = -1) -> _Floats:
    """Numerically stable ``softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x)``.

    Computed as ``exp(log_softmax(x))``; same input rules and reference as :func:`log_softmax`.

    >>> softmax([0.0, 1000.0, 1000.0]).tolist()
    [0.0, 0.5, 0.5]
    """
    return np.exp(log_softmax(logits, axis=axis))


def accuracy(pred: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy ``(1/N) sum_n 1[yhat_n = y_n]``.

    ``yhat`` is the argmax of ``(N, C)`` scores (first maximum on ties) or ``pred`` itself when it
    is ``(N,)`` class indices. Same as ``sklearn.metrics.accuracy_score`` on top-1 predictions.

    >>> accuracy([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], [1, 1, 1])
    0.6666666666666666
    """
    yhat, c, shape = _top1(pred, "pred")
    y = _labels(labels, yhat.shape[0], c, f"pred shape {shape}")
    return float(np.mean(yhat == y))


def nll(probs: ArrayLike, labels: ArrayLike, *, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-(1/N) sum_n log max(p_{n, y_n}, eps)``.

    Probabilities are used as given (rows must sum to 1 within 1e-3; they are not renormalised).
    Prefer :func:`nll_from_logits` when logits are available (Guo et al. 2017).

    >>> round(nll([[0.5, 0.5], [0.0, 1.0]], [0, 0]), 4)  # (log 2 + log 1e12) / 2
    14.1621
    """
    p = _probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1], f"probs shape {p.shape}")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], float(eps), 1.0))))


def nll_from_logits(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood ``-(1/N) sum_n log_softmax(z_n)_{y_n}`` from logits.

    Exact for huge logits: no probability is formed, so nothing is clipped (Guo et al. 2017).

    >>> nll_from_logits([[0.0, 1000.0]], [0])
    1000.0
    """
    z = _floats(logits, "logits", ndim=2)
    y = _labels(labels, z.shape[0], z.shape[1], f"logits shape {z.shape}")
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(y.size), y]))


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin reliability statistics; empty bins have ``count`` 0 and NaN means.

    Attributes:
        confidence: mean top-1 confidence of each bin, shape ``(n_bins,)``.
        accuracy: fraction of correct top-1 predictions in each bin, shape ``(n_bins,)``.
        count: number of samples in each bin (int64), shape ``(n_bins,)``.
        edges: bin boundaries, shape ``(n_bins + 1,)``, non-decreasing (see
            :func:`calibration_bins`).
    """

    confidence: _Floats
    accuracy: _Floats
    count: NDArray[np.int64]
    edges: _Floats


def calibration_bins(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    binning: Literal["equal_width", "equal_mass"] = "equal_width",
) -> CalibrationBins:
    """Bin samples by top-1 confidence ``c_n = max_k p_{n,k}`` and report each bin's statistics.

    ``"equal_width"`` (Naeini et al. 2015; Guo et al. 2017): ``edges = linspace(0, 1, n_bins+1)``
    and bin ``b`` holds ``edges[b] < c <= edges[b+1]`` (right-inclusive, so a confidence exactly on
    an edge goes to the lower bin; ``c = 0`` goes to bin 0). ``"equal_mass"`` (Nixon et al. 2019;
    Morales-Brotons et al. 2024 use 100 bins): stable-sort by confidence and split the order into
    ``n_bins`` consecutive groups like ``np.array_split`` (the first ``N % n_bins`` hold one extra).
    Ties are split by position, so equal confidences may land in adjacent bins, in input order;
    ``edges[b]`` is the smallest confidence in bin ``b`` and ``edges[-1]`` the largest overall.
    With ``n_bins > N`` the last bins are empty. The predicted class is the first argmax.

    >>> bins = calibration_bins([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], [0, 1, 0], n_bins=2)
    >>> bins.count.tolist(), bins.accuracy.tolist()
    ([0, 3], [nan, 0.6666666666666666])
    """
    p = _probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1], f"probs shape {p.shape}")
    if isinstance(n_bins, bool) or not hasattr(n_bins, "__index__"):
        raise TypeError(f"n_bins must be an int, got {n_bins!r} ({type(n_bins).__name__})")
    m = operator.index(n_bins)
    if m < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins!r}")
    conf = p.max(axis=1)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    if binning == "equal_width":
        edges = np.linspace(0.0, 1.0, m + 1)
        idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, m - 1)
    elif binning == "equal_mass":
        order = np.argsort(conf, kind="stable")
        n = conf.size
        sizes = np.full(m, n // m)
        sizes[: n % m] += 1
        idx = np.empty(n, dtype=np.int64)
        idx[order] = np.repeat(np.arange(m), sizes)
        starts = np.minimum(np.concatenate(([0], np.cumsum(sizes)[:-1])), n - 1)
        edges = np.append(conf[order][starts], conf.max())  # empty tail bins: start = max
    else:
        raise ValueError(f"binning must be one of ('equal_width', 'equal_mass'), got {binning!r}")
    count = np.bincount(idx, minlength=m).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty bin's mean is 0/0 = NaN
        mean_conf = np.bincount(idx, weights=conf, minlength=m) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=m) / count
    return CalibrationBins(mean_conf, mean_acc, count, edges)


def ece(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    binning: Literal["equal_width", "equal_mass"] = "equal_width",
) -> float:
    """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|`` over non-empty bins.

    Uses top-1 confidence; bins (and their edge/tie conventions) are those of
    :func:`calibration_bins`. Guo et al. (2017); equal-mass bins after Nixon et al. (2019).

    >>> round(ece([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], [0, 1, 0], n_bins=2), 12)  # |2/3 - 2.3/3|
    0.1
    """
    b = calibration_bins(probs, labels, n_bins=n_bins, binning=binning)
    filled = b.count > 0
    gaps = np.abs(b.accuracy[filled] - b.confidence[filled])
    return float(np.sum(b.count[filled] * gaps) / b.count.sum())


def agreement(pred_a: ArrayLike, pred_b: ArrayLike) -> float:
    """Fraction of samples whose top-1 predictions agree, ``(1/N) sum_n 1[yhat^a_n = yhat^b_n]``.

    Each argument is ``(N, C)`` scores (first argmax) or ``(N,)`` class indices
    (Bhojanapalli et al. 2021; Morales-Brotons et al. 2024).

    >>> agreement([[0.9, 0.1], [0.3, 0.7]], [0, 0])
    0.5
    """
    a, ca, sa = _top1(pred_a, "pred_a")
    b, cb, sb = _top1(pred_b, "pred_b")
    if a.shape != b.shape or (ca is not None and cb is not None and ca != cb):
        raise ValueError(f"pred_a shape {sa} and pred_b shape {sb} do not match")
    return float(np.mean(a == b))


def churn(pred_a: ArrayLike, pred_b: ArrayLike) -> float:
    """Prediction churn ``(1/N) sum_n 1[yhat^a_n != yhat^b_n] = 1 - agreement``.

    Bhojanapalli et al. (2021); Morales-Brotons et al. (2024), Table 3.

    >>> churn([2, 0, 1, 1], [2, 1, 1, 1])
    0.25
    """
    return 1.0 - agreement(pred_a, pred_b)


def js_divergence(p: ArrayLike, q: ArrayLike, *, base: float | None = None) -> float:
    """Mean Jensen-Shannon divergence ``(1/N) sum_n [KL(p_n||m_n) + KL(q_n||m_n)] / 2``.

    ``m = (p + q) / 2``, ``KL(p||m) = sum_k p_k log(p_k / m_k)`` with ``0 log 0 = 0``; natural log
    unless ``base`` is given (``base=2`` bounds it by 1). A 1-D input is one distribution.
    This is the square of ``scipy.spatial.distance.jensenshannon`` (Morales-Brotons et al. 2024).

    >>> js_divergence([1.0, 0.0], [0.0, 1.0], base=2)
    1.0
    """
    if base is not None:
        if isinstance(base, bool) or not isinstance(base, (int, float, np.number)):
            raise TypeError(f"base must be a number or None, got {base!r}")
        if not (np.isfinite(base) and base > 0 and base != 1):
            raise ValueError(f"base must be finite, > 0 and != 1, got {base!r}")
    pa, qa = _array(p, "p"), _array(q, "q")
    if pa.shape != qa.shape:
        raise ValueError(f"p shape {pa.shape} and q shape {qa.shape} do not match")
    pp, qq = (_probs(a.reshape(1, -1) if a.ndim == 1 else a, n) for a, n in ((pa, "p"), (qa, "q")))
    m = 0.5 * (pp + qq)

    def kl(a: _Floats) -> _Floats:
        pos = a > 0  # m > 0 wherever a > 0
        return np.sum(a * np.log(np.where(pos, a, 1.0) / np.where(pos, m, 1.0)), axis=1)

    div = np.maximum(0.5 * (kl(pp) + kl(qq)), 0.0)  # rounding can dip below 0
    if base is not None:
        div = div / np.log(float(base))
    return float(np.mean(div))


def _pair(pred: Any, target: Any) -> _Floats:
    a, b = _floats(pred, "pred"), _floats(target, "target")
    if a.shape != b.shape:
        raise ValueError(f"pred shape {a.shape} and target shape {b.shape} do not match")
    if a.size == 0:
        raise ValueError(f"pred and target are empty (shape {a.shape}); the metric is undefined")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"pred and target must be finite (shape {a.shape})")
    return a - b


def rmse(pred: ArrayLike, target: ArrayLike) -> float:
    """Root mean squared error ``sqrt((1/n) sum_i (pred_i - target_i)^2)`` over all elements.

    Equals ``sqrt(sklearn.metrics.mean_squared_error)`` (uniform over outputs); shapes must match.

    >>> rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    1.1547005383792515
    """
    d = np.abs(_pair(pred, target))
    s = float(d.max())
    return 0.0 if s == 0.0 else s * float(np.sqrt(np.mean(np.square(d / s))))  # no overflow


def mae(pred: ArrayLike, target: ArrayLike) -> float:
    """Mean absolute error ``(1/n) sum_i |pred_i - target_i|`` over all elements.

    Equals ``sklearn.metrics.mean_absolute_error`` (uniform over outputs); shapes must match.

    >>> mae([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    0.6666666666666666
    """
    return float(np.mean(np.abs(_pair(pred, target))))
