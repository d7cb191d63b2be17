"""Streaming linear combinations of snapshot files: each file read once, front to back.

:func:`combine` computes ``out_k = sum_i w_ki snapshot_i`` for every output ``k`` at once. It
walks the tensors in the order they are stored and, chunk by chunk, reads the same span from
every file into one ``(files, chunk)`` matrix ``S`` and multiplies: ``out = W @ S``. So every
byte is read once, the outputs are written once (a file-by-file loop would pass over all K
outputs once per file), and memory stays at the outputs plus a few chunk buffers. A thread reads
(and checksums) the next chunk while the current one is multiplied.

The product is taken around an anchor row ``a`` (the row of the largest weights):
``out = S_a + W @ (S - S_a)``, equal to ``W @ S`` because each row of ``W`` sums to 1; it is
exact for a constant weight stream and rounds only the (small) differences between snapshots.
The subtraction is fused with the conversion of the stored dtype (e.g. float16) to float32.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from polyak.posthoc import store
from polyak.posthoc.reader import Entry, Stream, layout_key

__all__ = ["combine"]

GROUP = 128  # files open at once; more are combined in several passes (still one read each)
_SLOTS = 2  # staging buffers: one being filled by the reader thread, one being multiplied


@dataclass(frozen=True)
class _Step:
    """One unit of reading: a chunk ``[a, a + c)`` of a run of averaged tensors, or one copied
    tensor (``c`` bytes, ``run`` holding just it)."""

    run: list[Entry]
    averaged: bool
    a: int = 0
    c: int = 0


def _runs(entries: list[Entry], averaged: set[str]) -> list[list[Entry]]:
    """Consecutive averaged tensors of one dtype form a run; a copied tensor is a run alone."""
    runs: list[list[Entry]] = []
    for e in entries:
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and e.name in averaged
            and last.name in averaged
            and last.dtype == e.dtype
            and last.end == e.begin
        ):
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _steps(entries: list[Entry], averaged: set[str], width: int) -> Iterator[_Step]:
    for run in _runs(entries, averaged):
        if run[0].name not in averaged:
            yield _Step(run, False)
            continue
        total = sum(e.numel for e in run)
        for a in range(0, total, width):
            yield _Step(run, True, a, min(width, total - a))


def combine(
    files: Sequence[store.SnapshotFile],
    weights: np.ndarray,
    averaged: set[str],
    copy_from: int,
    dtype: torch.dtype = torch.float32,
    chunk_bytes: int = 8 << 20,
) -> list[dict[str, torch.Tensor]]:
    """``[{name: sum_i weights[k, i] * files[i][name]} for k]``; copied tensors from one file.

    Args:
        files: the snapshot files (their manifest entries), all with the same tensors.
        weights: ``(outputs, files)`` coefficients, each row summing to 1.
        averaged: names of the averaged tensors; the others are copied from ``files[copy_from]``.
        copy_from: index of the file that supplies copied tensors (e.g. the latest).
        dtype: dtype of the averaged outputs.
        chunk_bytes: size of the ``(files, chunk)`` matrix multiplied at once.

    Raises:
        ChecksumError: a file is missing, truncated, or does not match its CRC-32 (named, with
            its step); nothing is returned then.
    """
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[1]
    anchor = int(np.argmax(np.abs(w).sum(axis=0)))
    order = [anchor] + [i for i in range(n) if i != anchor]
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in range(w.shape[0])]
    for first in range(0, n, GROUP):
        rows = (
            order[first : first + GROUP] if first == 0 else [anchor, *order[first : first + GROUP]]
        )
        _Pass([files[i] for i in rows], torch.as_tensor(w[:, rows]).to(dtype), dtype).run(
            averaged,
            rows.index(copy_from) if copy_from in rows else None,
            outputs,
            chunk_bytes,
            accumulate=first > 0,
        )
    return outputs


class _Pass:
    """One pass over up to :data:`GROUP` files (row 0 is the anchor)."""

    def __init__(self, files: list[store.SnapshotFile], w: torch.Tensor, dtype: torch.dtype):
        self.files, self.w, self.dtype = files, w, dtype

    def run(
        self,
        averaged: set[str],
        copy_row: int | None,
        outputs: list[dict[str, torch.Tensor]],
        chunk_bytes: int,
        accumulate: bool,
    ) -> None:
        streams: list[Stream] = []
        try:
            for f in self.files:
                streams.append(Stream(f))
            ref = layout_key(streams[0])
            for s in streams[1:]:
                if layout_key(s) != ref:
                    raise store.StoreError(
                        f"{s.file.path} holds other tensors than {streams[0].file.path}; "
                        "a store's files must all hold the same tensors"
                    )
            entries = streams[0].entries
            n = len(streams)
            width = max(1, chunk_bytes // (self.dtype.itemsize * n))
            item = max((e.dtype.itemsize for e in entries if e.name in averaged), default=1)
            slots = [[bytearray(width * item) for _ in range(n)] for _ in range(_SLOTS)]
            steps = list(_steps(entries, averaged, width))
            matrix = torch.empty(n, width, dtype=self.dtype)
            self._consume(streams, steps, slots, matrix, copy_row, outputs, accumulate)
            for s in streams:
                s.finish()
        finally:
            for s in streams:
                s.close()

    def _consume(
        self,
        streams: list[Stream],
        steps: list[_Step],
        slots: list[list[bytearray]],
        matrix: torch.Tensor,
        copy_row: int | None,
        outputs: list[dict[str, torch.Tensor]],
        accumulate: bool,
    ) -> None:
        ready: queue.Queue[tuple[int, object] | BaseException | None] = queue.Queue()
        free: queue.Queue[int | None] = queue.Queue()
        for i in range(len(slots)):
            free.put(i)
        reader = threading.Thread(
            target=_produce, args=(streams, steps, slots, copy_row, ready, free), daemon=True
        )
        reader.start()
        try:
            for step in steps:
                got = ready.get()
                if isinstance(got, BaseException):
                    raise got
                assert got is not None
                slot, copied = got
                if step.averaged:
                    self._multiply(step, slots[slot], matrix, outputs, accumulate)
                elif isinstance(copied, bytes):
                    e = step.run[0]
                    value = torch.frombuffer(bytearray(copied), dtype=e.dtype) if copied else None
                    for out in outputs:
                        out[e.name] = (
                            torch.empty(e.shape, dtype=e.dtype)
                            if value is None
                            else value.reshape(e.shape).clone()
                        )
                free.put(slot)
        finally:
            free.put(None)  # stops the reader if we leave early
            reader.join()

    def _multiply(
        self,
        step: _Step,
        slot: list[bytearray],
        matrix: torch.Tensor,
        outputs: list[dict[str, torch.Tensor]],
        accumulate: bool,
    ) -> None:
        run, a, c = step.run, step.a, step.c
        src = run[0].dtype
        if a == 0 and not accumulate:
            for e in run:
                for out in outputs:
                    out[e.name] = torch.empty(e.shape, dtype=self.dtype)
        block = matrix[:, :c]
        anchor = block[0]
        anchor.copy_(torch.frombuffer(slot[0], dtype=src, count=c))
        for i in range(1, len(slot)):
            torch.sub(torch.frombuffer(slot[i], dtype=src, count=c), anchor, out=block[i])
        result = self.w[:, 1:] @ block[1:]
        if not accumulate:
            result += anchor
        start = 0
        for e in run:
            lo, hi = max(a, start), min(a + c, start + e.numel)
            if lo < hi:
                for k, out in enumerate(outputs):
                    piece = result[k, lo - a : hi - a]
                    dst = out[e.name].view(-1)[lo - start : hi - start]
                    dst.add_(piece) if accumulate else dst.copy_(piece)
            start += e.numel
            if start >= a + c:
                break


def _produce(
    streams: list[Stream],
    steps: list[_Step],
    slots: list[list[bytearray]],
    copy_row: int | None,
    ready: queue.Queue,
    free: queue.Queue,
) -> None:
    """Reader thread: fill a free slot with the next step's bytes from every file."""
    try:
        for step in steps:
            slot = free.get()
            if slot is None:
                return
            if step.averaged:
                item = step.run[0].dtype.itemsize
                begin = step.run[0].begin + step.a * item
                for s, buf in zip(streams, slots[slot]):
                    s.read_into(begin, memoryview(buf)[: step.c * item])
                ready.put((slot, None))
                continue
            e = step.run[0]
            kept = b""
            for i, s in enumerate(streams):
                buf = bytearray(e.end - e.begin)
                s.read_into(e.begin, memoryview(buf))
                if i == copy_row:
                    kept = bytes(buf)
            ready.put((slot, kept if copy_row is not None else None))
    except BaseException as e:
        ready.put(e)
