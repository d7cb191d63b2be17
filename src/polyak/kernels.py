"""Functional EMA kernels for NumPy arrays and torch tensors (the pure core).

One update of an exponential moving average (EMA) of weights is

    avg <- decay * avg + (1 - decay) * value  ==  avg + (1 - decay) * (value - avg)

which is ``torch.lerp(avg, value, 1 - decay)``. Both NumPy and torch evaluate it with the
two-sided lerp formula (``avg + w*(value-avg)`` for ``w < 0.5``, ``value - (value-avg)*(1-w)``
otherwise), so ``decay=0`` copies ``value`` exactly, ``decay=1`` leaves ``avg`` untouched and a
constant input is an exact fixed point.

Overflow: ``value - avg`` passes the dtype's max for finite inputs of opposite signs near it
(float32 ``(-3e38, 3e38)``). The NumPy path recomputes those elements without overflow, so
finite inputs always give a finite average. The torch path is ``torch.lerp`` (what
:class:`polyak.EMA` runs too), which returns ``inf`` there for float32/float64; ruling it out
would read both inputs once more, more than the update costs. float16 and bfloat16 compute in
float32 on both paths and cannot overflow.

This module imports NumPy only; torch is used when the caller passes torch tensors (and is
therefore already imported).

References:
    Polyak & Juditsky, "Acceleration of stochastic approximation by averaging", 1992.
    Morales-Brotons, Vogels & Hendrikx, "Exponential Moving Average of Weights in Deep Learning:
    Dynamics and Benefits", TMLR 2024, Eq. 1.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TypeVar

import numpy as np

from polyak._names import check_names
from polyak._tree import flatten, framework, rebuild

__all__ = ["check_decay", "ema_update", "ema_update_"]

T = TypeVar("T")


def check_decay(decay: object, what: str = "decay") -> float:
    """Return ``decay`` as a float after checking that it is a real number in [0, 1].

    Raises:
        TypeError: ``decay`` is not a real number (``bool`` included).
        ValueError: ``decay`` is NaN or outside [0, 1].
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a real number in [0, 1], got {decay!r}")
    value = float(decay)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{what} must be in [0, 1], got {decay!r}")
    return value


def _torch() -> Any:
    return sys.modules.get("torch")


def _pairs(avg: Any, value: Any) -> list[tuple[str, Any, Any]]:
    """Matching (path, avg_leaf, value_leaf) triples; the same leaves, mappings in any order."""
    a_items, v_items = flatten(avg, "avg"), flatten(value, "value")
    by_path = dict(v_items)
    check_names([p for p, _ in a_items], by_path, "value's leaves differ from avg's")
    return [(p, a, by_path[p]) for p, a in a_items]


def _check_leaf(where: str, avg: Any, value: Any) -> str:
    fa, fv = framework(avg), framework(value)
    if fa is None or fv is None:
        bad = type(avg if fa is None else value).__name__
        raise TypeError(f"at {where}: expected an array or tensor, got {bad}")
    if fa != fv:
        raise TypeError(f"at {where}: cannot mix frameworks (avg is {fa}, value is {fv})")
    kinds = []
    for name, x in (("avg", avg), ("value", value)):
        if fa == "numpy":
            kind = np.dtype(x.dtype).kind
        else:
            kind = "c" if x.is_complex() else "f" if x.is_floating_point() else "i"
        if kind not in "fc":
            raise TypeError(f"at {where}: {name} has dtype {x.dtype}; only floats can be averaged")
        kinds.append(kind)
    if kinds == ["f", "c"]:
        raise TypeError(
            f"at {where}: value is complex ({value.dtype}) but avg is real ({avg.dtype}); the "
            "imaginary part would be dropped"
        )
    if tuple(avg.shape) != tuple(value.shape):
        raise ValueError(
            f"at {where}: shape mismatch, avg {tuple(avg.shape)} vs value {tuple(value.shape)}"
        )
    if fa == "torch" and avg.device != value.device:
        raise ValueError(f"at {where}: avg is on {avg.device} but value is on {value.device}")
    return fa


def _check_writable(where: str, avg: Any) -> None:
    """``avg`` can be written in place (checked for every leaf before the first write)."""
    if isinstance(avg, np.ndarray):
        if not avg.flags.writeable:
            raise ValueError(f"at {where}: avg is read-only")
        return
    torch = _torch()
    if avg.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"at {where}: avg is an inference tensor; it cannot be written here")
    if avg.numel() > 1 and torch._debug_has_internal_overlap(avg) == 1:
        raise ValueError(
            f"at {where}: avg has elements that share memory (an expanded tensor); pass a "
            "tensor with its own storage, e.g. avg.clone()"
        )


def _validate(avg: Any, value: Any) -> list[tuple[str, Any, Any]]:
    pairs = _pairs(avg, value)
    for where, a, v in pairs:
        _check_leaf(where, a, v)
    return pairs


def _np_lerp_(avg: np.ndarray, value: np.ndarray, weight: float) -> None:
    """``avg <- lerp(avg, value, weight)`` in place; weight 0 leaves avg, 1 copies value (also
    inf/nan); float16 is computed in float32 and rounded once, as torch does.

    Finite inputs give a finite result: where ``value - avg`` overflows the dtype (float32
    ``(-3e38, 3e38)``), those elements are recomputed from halved inputs (:func:`_halved`). The
    test costs nothing: the processor's overflow flag, which NumPy reads after every ufunc,
    is set only when finite operands give an infinite difference (inf/nan inputs do not set
    it), and ``errstate(over="raise")`` turns it into an exception. A sum of the difference
    (one more read) cost up to 1.6x the update on arrays that fit in the cache.
    """
    if weight == 0.0:
        return
    if weight == 1.0:
        np.copyto(avg, value, casting="unsafe")
        return
    work = np.result_type(avg.dtype, np.float32)  # float16 is computed in float32
    a = avg.astype(work, copy=False)
    v = np.asarray(value, dtype=work)
    fix = None
    with np.errstate(invalid="ignore", over="ignore"):  # inf/nan propagate, as in torch
        try:
            with np.errstate(over="raise"):
                diff = v - a
        except FloatingPointError:
            diff = v - a
            fix = _halved(a, v, diff, weight)  # before ``a`` (maybe ``avg`` itself) is written
        if weight < 0.5:
            diff *= work.type(weight)
            np.add(a, diff, out=avg, casting="unsafe")
        else:
            diff *= work.type(1.0 - weight)
            np.subtract(v, diff, out=avg, casting="unsafe")
    if fix is not None:
        avg[fix[0]] = fix[1]


def _halved(
    a: np.ndarray, v: np.ndarray, diff: np.ndarray, weight: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Where ``diff = v - a`` overflowed although ``a`` and ``v`` are finite (opposite signs near
    the dtype's max): those positions and ``2 * lerp(a/2, v/2, weight)`` there. On the halves the
    two-sided lerp cannot overflow and rounds to a value between them, so doubling it stays
    finite, and the scaling is exact (such elements are far from subnormal). ``None`` when
    nothing overflowed."""
    over = np.isinf(diff) & np.isfinite(a + v)  # inf/nan inputs make ``a + v`` inf/nan
    if not over.any():
        return None
    half = a.dtype.type(0.5)
    ah, vh = a[over] * half, v[over] * half
    if weight < 0.5:
        out = ah + a.dtype.type(weight) * (vh - ah)
    else:
        out = vh - a.dtype.type(1.0 - weight) * (vh - ah)
    out *= 2
    return over, out


def ema_update_(avg: T, value: T, decay: float) -> T:
    """Update ``avg`` in place: ``avg <- decay*avg + (1-decay)*value``; return ``avg``.

    ``avg`` and ``value`` are NumPy arrays or torch tensors, or matching (possibly nested) lists,
    tuples or dicts of them. The arithmetic runs in ``avg``'s dtype. Everything is validated before
    anything is written, so a bad input leaves ``avg`` untouched. Lists of torch tensors are updated
    with one ``torch._foreach_lerp_`` call per (device, dtype) group. Finite NumPy inputs give a
    finite result even where ``value - avg`` would overflow; torch tensors follow ``torch.lerp``
    (see the module docstring).

    Args:
        avg: the running average (float or complex dtype), updated in place.
        value: the new value, same structure and shapes as ``avg``.
        decay: weight kept on the old average, in [0, 1].

    Returns:
        ``avg``.

    Raises:
        TypeError: non-float arrays, mixed NumPy/torch, or an unsupported container.
        ValueError: ``decay`` outside [0, 1], or mismatched shapes, keys or lengths.

    Examples:
        >>> import numpy as np
        >>> avg = np.zeros(3)
        >>> ema_update_(avg, np.ones(3), decay=0.9)
        array([0.1, 0.1, 0.1])
    """
    weight = 1.0 - check_decay(decay)
    pairs = _validate(avg, value)
    for where, a, _ in pairs:
        _check_writable(where, a)
    torch_pairs = [(a, v) for _, a, v in pairs if not isinstance(a, np.ndarray)]
    for _, a, v in pairs:
        if isinstance(a, np.ndarray):
            _np_lerp_(a, v, weight)
    if torch_pairs:
        lerp_lists_([a for a, _ in torch_pairs], [v for _, v in torch_pairs], weight)
    return avg


def ema_update(avg: T, value: T, decay: float) -> T:
    """Return ``decay*avg + (1-decay)*value`` as new arrays; the inputs are not modified.

    Same structures and checks as :func:`ema_update_`. The result has the promoted dtype of
    ``avg`` and ``value`` (for example float32 and float64 give float64).

    Examples:
        >>> import numpy as np
        >>> ema_update(np.array([1.0, 2.0]), np.array([3.0, 4.0]), decay=0.5)
        array([2., 3.])
    """
    weight = 1.0 - check_decay(decay)
    pairs = _validate(avg, value)
    out = []
    for _, a, v in pairs:
        if isinstance(a, np.ndarray):
            r = np.array(a, dtype=np.result_type(a, v), copy=True)
            _np_lerp_(r, v, weight)
        else:
            torch = _torch()
            dtype = torch.promote_types(a.dtype, v.dtype)
            with torch.no_grad():
                r = a.to(dtype, copy=True)
                lerp_lists_([r], [v], weight)
        out.append(r)
    return rebuild(avg, out.__getitem__)


def lerp_lists_(avgs: list[Any], values: list[Any], weight: float) -> None:
    """``avgs[i] <- lerp(avgs[i], values[i], weight)`` for torch tensors, grouped for foreach.

    Tensors whose dtype or device differs from their average's are handled per tensor with a
    cast copy of that one tensor (the functional API is not the hot path; :class:`polyak.EMA`
    avoids the cast). ``weight`` is ``1 - decay``: 0 leaves the averages untouched and 1 copies
    the values, exactly, also where they hold ``inf``/``nan`` (a lerp would give ``nan``).
    """
    torch = _torch()
    if not math.isfinite(weight):
        raise ValueError(f"lerp weight must be finite, got {weight}")
    if weight == 0.0:
        return
    groups: dict[tuple[Any, Any], tuple[list[Any], list[Any]]] = {}
    with torch.no_grad():
        for a, v in zip(avgs, values):
            if (a.dtype, a.device) != (v.dtype, v.device):
                v = v.to(a.device, a.dtype)
                a.copy_(v) if weight == 1.0 else a.lerp_(v, weight)
                continue
            ga, gv = groups.setdefault((a.device, a.dtype), ([], []))
            ga.append(a)
            gv.append(v)
        for ga, gv in groups.values():
            if weight == 1.0:
                torch._foreach_copy_(ga, gv)
            else:
                torch._foreach_lerp_(ga, gv, weight)
