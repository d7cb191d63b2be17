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

The two threads split the work by what bounds it. The reader thread only reads and checksums
(CRC-32C in hardware: ~16 GB/s, so the disk bounds it). The calling thread converts and
multiplies in blocks of a few thousand columns whose float32 copy stays in the L2 cache: the
stored dtype (e.g. float16) is converted, the anchor subtracted and ``W`` applied while the
block is in cache, so the float32 matrix never goes through main memory. (Reading each file's
chunk straight into the blocks' rows with ``preadv``, to make each conversion contiguous, was
measured slower: the kernel's copies into many small buffers cost more than they saved.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from polyak.posthoc.reader import Entry, Layout, Stream, layout_key
from polyak.posthoc.reading import Pins
from polyak.posthoc.store import SnapshotFile, StoreError

__all__ = ["combine"]

GROUP = 128  # files open at once; more are combined in several passes (still one read each)
_SLOTS = 2  # staging buffers: one being filled by the reader thread, one being multiplied
_BLOCK_BYTES = 2 << 20  # float32 working block (files x columns), sized for the L2 cache


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
    files: Sequence[SnapshotFile],
    weights: np.ndarray,
    averaged: set[str],
    copy_from: int,
    layout: Layout,
    dtype: torch.dtype = torch.float32,
    chunk_bytes: int = 32 << 20,
    pins: Pins | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``[{name: sum_i weights[k, i] * files[i][name]} for k]``; copied tensors from one file.

    Args:
        files: the snapshot files (their manifest entries), checked with
            :func:`~polyak.posthoc.reading.check_files`, which gives the ``pins`` they are read
            through.
        weights: ``(outputs, files)`` coefficients, each row summing to 1.
        averaged: names of the averaged tensors; the others are copied from ``files[copy_from]``.
        copy_from: index of the file that supplies copied tensors (e.g. the latest).
        layout: the tensors every file must hold (names, dtypes, shapes), from the manifest.
        dtype: dtype of the averaged outputs.
        chunk_bytes: bytes of every file's chunk read at once (two such buffers are in use).

    Raises:
        ChecksumError: a file is missing, truncated, or does not match its checksum (named,
            with its step); StoreError: a file's tensors are not the manifest's. Nothing is
            returned then.
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
        w_rows = torch.as_tensor(w[:, rows]).to(dtype)
        _Pass([files[i] for i in rows], w_rows, dtype, layout, pins).run(
            averaged,
            rows.index(copy_from) if copy_from in rows else None,
            outputs,
            chunk_bytes,
            adding=first > 0,
            anchored=first + GROUP >= n,
        )
    return outputs


class _Slot:
    """A staging buffer: the raw bytes of one chunk of every file (row ``i``: file ``i``)."""

    def __init__(self, n: int, width: int, item: int) -> None:
        self.raw = bytearray(n * width * item)
        self.n, self.width, self.item = n, width, item
        self.copied = b""

    def row(self, i: int, c: int) -> memoryview:
        """Where file ``i``'s ``c`` columns of a chunk go."""
        at = i * self.width * self.item
        return memoryview(self.raw)[at : at + c * self.item]


class _Pass:
    """One pass over up to :data:`GROUP` files (row 0 is the anchor)."""

    def __init__(
        self,
        files: list[SnapshotFile],
        w: torch.Tensor,
        dtype: torch.dtype,
        layout: Layout,
        pins: Pins | None,
    ) -> None:
        self.files, self.w, self.dtype, self.layout, self.pins = files, w, dtype, layout, pins

    def run(
        self,
        averaged: set[str],
        copy_row: int | None,
        outputs: list[dict[str, torch.Tensor]],
        chunk_bytes: int,
        adding: bool,
        anchored: bool,
    ) -> None:
        """Combine this pass's files into ``outputs`` (``adding`` to what earlier passes left
        there); the last pass (``anchored``) adds the anchor row, so that the passes before it
        sum small differences, rounded relative to the differences rather than the weights."""
        streams: list[Stream] = []
        try:
            for f in self.files:
                streams.append(Stream(f, self.layout, self.pins))
            ref = layout_key(streams[0])
            for s in streams[1:]:
                if layout_key(s) != ref:
                    raise StoreError(
                        f"{s.file.path} holds other tensors than {streams[0].file.path}; "
                        "a store's files must all hold the same tensors",
                        file=s.file,
                    )
            entries = streams[0].entries
            n = len(streams)
            longest = max((sum(e.numel for e in r) for r in _runs(entries, averaged)), default=1)
            item = max((e.dtype.itemsize for e in entries if e.name in averaged), default=1)
            block = max(1, min(_BLOCK_BYTES // (self.dtype.itemsize * n), longest))
            width = max(1, min(chunk_bytes // (item * n), longest))
            slots = [_Slot(n, width, item) for _ in range(_SLOTS)]
            self.matrix = torch.empty(n, block, dtype=self.dtype)
            self.anchor = torch.empty(block, dtype=self.dtype)
            self.result = torch.empty(self.w.shape[0], width, dtype=self.dtype)
            steps = list(_steps(entries, averaged, width))
            if not adding:
                for e in entries:
                    if e.name in averaged:
                        for out in outputs:
                            out[e.name] = torch.empty(e.shape, dtype=self.dtype)
            self.adding, self.anchored = adding, anchored
            self._consume(streams, steps, slots, copy_row, outputs)
            for s in streams:
                s.finish()
        finally:
            for s in streams:
                s.close()

    def _consume(
        self,
        streams: list[Stream],
        steps: list[_Step],
        slots: list[_Slot],
        copy_row: int | None,
        outputs: list[dict[str, torch.Tensor]],
    ) -> None:
        ready: queue.Queue[_Slot | BaseException] = queue.Queue()
        free: queue.Queue[_Slot | None] = queue.Queue()
        for slot in slots:
            free.put(slot)
        reader = threading.Thread(
            target=_produce, args=(streams, steps, copy_row, ready, free), daemon=True
        )
        reader.start()
        try:
            for step in steps:
                got = ready.get()
                if isinstance(got, BaseException):
                    raise got
                if step.averaged:
                    self._multiply(step, got, outputs)
                elif copy_row is not None:
                    e = step.run[0]
                    value = (
                        torch.frombuffer(bytearray(got.copied), dtype=e.dtype) if e.numel else None
                    )
                    for out in outputs:
                        out[e.name] = (
                            torch.empty(e.shape, dtype=e.dtype)
                            if value is None
                            else value.reshape(e.shape).clone()
                        )
                free.put(got)
        finally:
            free.put(None)  # stops the reader if we leave early
            reader.join()

    def _multiply(self, step: _Step, slot: _Slot, outputs: list[dict[str, torch.Tensor]]) -> None:
        run, a, c = step.run, step.a, step.c
        n, dtype = slot.n, run[0].dtype
        stored = torch.frombuffer(slot.raw, dtype=dtype, count=n * slot.width).view(n, slot.width)
        block = self.matrix.shape[1]
        for j in range(0, c, block):  # one block in the cache at a time
            k = min(block, c - j)
            m, anchor = self.matrix[:, :k], self.anchor[:k]
            m.copy_(stored[:, j : j + k])
            anchor.copy_(m[0])
            m.sub_(anchor)  # row 0 (the anchor) is now 0
            out = self.result[:, j : j + k]
            if self.anchored:
                torch.addmm(anchor, self.w, m, out=out)
            else:
                torch.mm(self.w, m, out=out)
        result = self.result[:, :c]
        start = 0
        for e in run:
            lo, hi = max(a, start), min(a + c, start + e.numel)
            if lo < hi:
                for k, out_k in enumerate(outputs):
                    piece = result[k, lo - a : hi - a]
                    dst = out_k[e.name].view(-1)[lo - start : hi - start]
                    dst.add_(piece) if self.adding else dst.copy_(piece)
            start += e.numel
            if start >= a + c:
                break


def _produce(
    streams: list[Stream],
    steps: list[_Step],
    copy_row: int | None,
    ready: queue.Queue,
    free: queue.Queue,
) -> None:
    """Reader thread: fill a free slot with the next step's bytes from every file (and check
    them on the way)."""
    try:
        for step in steps:
            slot = free.get()
            if slot is None:
                return
            e = step.run[0]
            if not step.averaged:
                slot.copied = b""
                for i, s in enumerate(streams):
                    buf = bytearray(e.end - e.begin)
                    s.read_into(e.begin, memoryview(buf))
                    if i == copy_row:
                        slot.copied = bytes(buf)
                ready.put(slot)
                continue
            begin = e.begin + step.a * e.dtype.itemsize
            for i, s in enumerate(streams):
                s.read_into(begin, slot.row(i, step.c))
            ready.put(slot)
    except BaseException as e:
        ready.put(e)
