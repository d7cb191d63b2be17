"""The merge's inner loop: spans of every tensor read ahead in a thread, added in this one.

The tensors are walked in the output's order, each in spans; for each span a reader thread
fills a slot with that span of every source of non-zero weight (or, for an integer tensor, of
the latest source) while the calling thread adds the previous slot into the accumulator
(``acc += w_i x_i``, torch kernels that release the GIL), checks it, casts it and hands it to
the writer. Reading (a copy out of the page cache, or a wait on the disk) and adding overlap on
two cores. Two slots of :data:`SLOT_BYTES` each: the span shrinks as sources are added, so the
memory is the same for 4 checkpoints or 16.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from polyak.errors import NonFiniteError
from polyak.merge._source import Source

__all__ = ["SLOT_BYTES", "stream"]

SLOT_BYTES = 8 << 20  # per slot: a span of every source's bytes
_SLOTS = 2  # one being filled by the reader, one being added


class _Slot:
    def __init__(self, sources: int, span_bytes: int) -> None:
        self.buffers = [bytearray(span_bytes) for _ in range(max(sources, 1))]
        self.parts: list[torch.Tensor] = []


def _spans(
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], span: int
) -> Iterator[tuple[str, int, int]]:
    for name, _, shape in tensors:
        n = math.prod(shape)
        for a in range(0, max(n, 1), span):  # an empty tensor: one empty span
            yield name, a, min(a + span, n)


def stream(
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    sources: Sequence[Source],
    weights: np.ndarray,
    accumulate: torch.dtype,
    write: Callable[[str, torch.Tensor], None],
) -> tuple[list[str], list[str]]:
    """Write ``sum_i w_i source_i`` of each floating tensor (and the latest source's integer
    tensors) through ``write(name, span)``, in order; returns the names averaged and copied.

    Raises:
        NonFiniteError: a span of an averaged tensor holds inf/nan (the sources holding it
            named); nothing more is written.
    """
    latest = sources[-1]
    active = [(s, float(x)) for s, x in zip(sources, weights) if x != 0.0]
    span = max(4096, SLOT_BYTES // (8 * max(len(active), 1)))
    slots = [_Slot(len(active), span * 8) for _ in range(_SLOTS)]
    floating = {name: latest.tensors[name][0].is_floating_point for name, _, _ in tensors}
    ready: queue.Queue[_Slot | BaseException] = queue.Queue()
    free: queue.Queue[_Slot | None] = queue.Queue()
    for slot in slots:
        free.put(slot)

    def produce() -> None:
        try:
            for name, a, b in _spans(tensors, span):
                slot = free.get()
                if slot is None:
                    return
                if floating[name]:
                    slot.parts = [s.read(name, a, b, buf)
                                  for (s, _), buf in zip(active, slot.buffers)]  # fmt: skip
                else:
                    slot.parts = [latest.read(name, a, b, slot.buffers[0])]
                ready.put(slot)
        except BaseException as e:  # the calling thread raises it
            ready.put(e)

    reader = threading.Thread(target=produce, name="polyak-merge-reader", daemon=True)
    reader.start()
    wide = torch.float64 if any(s.tensors[n][0] == torch.float64 for s, _ in active
                                for n in floating) else accumulate  # fmt: skip
    acc = torch.empty(span, dtype=wide)
    out_dtype = {name: dtype for name, dtype, _ in tensors}
    averaged: dict[str, None] = {}
    copied: dict[str, None] = {}
    try:
        for name, a, b in _spans(tensors, span):
            got = ready.get()
            if isinstance(got, BaseException):
                raise got
            if floating[name]:
                part = acc[: b - a]
                part.zero_()
                for x, (_, w) in zip(got.parts, active):
                    part.add_(x, alpha=w)
                if not bool(torch.isfinite(part.sum())) and not bool(torch.isfinite(part).all()):
                    raise _nonfinite(name, got.parts, active)
                write(name, part if out_dtype[name] == wide else part.to(out_dtype[name]))
                averaged[name] = None
            else:
                write(name, got.parts[0])
                copied[name] = None
            got.parts = []
            free.put(got)
    finally:
        free.put(None)  # stops the reader if we leave early
        reader.join()
    return list(averaged), list(copied)


def _nonfinite(
    name: str, parts: list[torch.Tensor], active: list[tuple[Source, float]]
) -> NonFiniteError:
    bad = [s.name for x, (s, _) in zip(parts, active) if not bool(torch.isfinite(x).all())]
    where = ", ".join(bad) if bad else "the weighted sum (it overflows)"
    return NonFiniteError(
        f"tensor {name!r} holds inf/nan in {where}; nothing was written. Leave that checkpoint "
        "out of the merge (or give it the weight 0)",
        [name],
    )
