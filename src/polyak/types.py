"""The types of polyak's public signatures, for annotating code that calls polyak.

``DecayLike`` is what every ``decay=`` argument takes; the ``Literal`` aliases name the string
modes, so a type checker catches ``nonfinite="ignore"`` before the runtime check does. Pure
core: imports the standard library and :mod:`polyak.schedules` only.

Example:
    >>> from polyak.types import DecayLike
    >>> def make(decay: DecayLike = 0.999) -> "polyak.EMA": ...  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias, TypedDict, Union

from polyak.schedules import Schedule

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "ArrayTree",
    "BufferPolicy",
    "DecayLike",
    "EMAOptions",
    "FrozenPolicy",
    "NonFinite",
    "OneDecay",
    "TensorLayout",
]

OneDecay: TypeAlias = float | Schedule | Callable[[int, int], float]
"""One average's decay: a float (constant decay), a :class:`polyak.schedules.Schedule`, or a
callable ``(t, dt) -> decay over the dt steps``."""

DecayLike: TypeAlias = OneDecay | Sequence[OneDecay] | Mapping[str, OneDecay]
"""What ``decay=`` takes: one decay, or a sequence or dict of them (one average each; a dict
names them)."""

NonFinite: TypeAlias = Literal["propagate", "raise", "skip"]
"""What an update does with inf/nan in the live weights: let it in (reported when an average
is handed out), raise naming the tensors, or leave the averages unchanged for that update."""

BufferPolicy: TypeAlias = Literal["average", "copy", "ignore"]
"""What happens to a model's floating-point buffers (BatchNorm statistics): averaged like the
weights, copied from the live model at each update, or left out."""

FrozenPolicy: TypeAlias = Literal["live", "average"]
"""What happens to parameters that do not require grad when an EMA is built (a PEFT model's
frozen base): ``"live"`` reads their average from the model, which is the same tensor (not
stored); ``"average"`` stores and averages them like the others."""

ArrayTree: TypeAlias = Union["np.ndarray", Sequence["ArrayTree"], Mapping[str, "ArrayTree"]]
"""NumPy arrays, or lists, tuples and string-keyed dicts of them (nested)."""


class EMAOptions(TypedDict, total=False):
    """The keyword arguments of :class:`polyak.EMA` after ``decay``, which the classes built on
    it (``PostHocEMA``, the Lightning and Hugging Face callbacks) pass through
    (``**ema_kwargs: Unpack[EMAOptions]``); see :class:`polyak.EMA` for each."""

    buffers: BufferPolicy
    include: str | Iterable[str] | None
    exclude: str | Iterable[str] | None
    dtype: torch.dtype
    device: torch.device | str | None
    update_every: int
    start_step: int
    flat_params: bool
    stochastic_rounding: bool
    seed: int
    compile_update: bool
    nonfinite: NonFinite
    frozen: FrozenPolicy


@dataclass(frozen=True)
class TensorLayout:
    """How :class:`polyak.EMA` stores one tracked tensor (:meth:`polyak.EMA.layout`).

    Attributes:
        kind: ``"average"`` (averaged, one copy per average) or ``"copied"`` (copied from the
            live model at each update, shared by every average: integer buffers, or floating
            ones with ``buffers="copy"``).
        shape: the shape stored on this rank (a shard's, under FSDP2; ``(n,)`` for the ``n``
            elements of a ZeRO-3 partition).
        dtype: the stored copy's dtype (the average's, float32 by default).
        global_shape: the full tensor's shape (``shape`` when not sharded).
        offset: where this rank's shard starts in the full tensor (zeros when not sharded).
        sharded: the tensor is sharded across ranks (FSDP2, DeepSpeed ZeRO-3): this rank holds
            the slice at ``offset`` (possibly all of it, or none).
        flat_offset: ZeRO-3 only (else ``None``): this rank holds the elements
            ``[flat_offset, flat_offset + shape[0])`` of the flattened full tensor, a flat range
            rather than the block ``offset`` + ``shape``.
    """

    kind: Literal["average", "copied"]
    shape: tuple[int, ...]
    dtype: torch.dtype
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    sharded: bool = False
    flat_offset: int | None = None
