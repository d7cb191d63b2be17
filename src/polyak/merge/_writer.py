"""The merged weights written in the Hugging Face layout, one tensor span at a time.

Every tensor's dtype and shape is known before the first byte is computed, so each shard's
safetensors header (with the merge's metadata) is written first and the data streamed after it,
in order: nothing is held but the span being written. One shard is ``model.safetensors``;
several are ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``
(``metadata.total_size`` and ``weight_map``), which ``from_pretrained`` and
``load_state_dict`` read. The files are staged (:class:`polyak.files.Outputs`): they replace
nothing until every one is complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from polyak.files import Outputs
from polyak.merge._safetensors import dtype_code

__all__ = ["INDEX", "Shard", "ShardWriter", "plan_shards"]

INDEX = "model.safetensors.index.json"


@dataclass
class Shard:
    """One output file: its name and tensors (name, dtype, shape), in the order written."""

    name: str
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for _, d, s in self.tensors)

    def header(self, metadata: dict[str, str]) -> bytes:
        table: dict[str, object] = {"__metadata__": metadata}
        at = 0
        for name, dtype, shape in self.tensors:
            n = math.prod(shape) * dtype.itemsize
            table[name] = {"dtype": dtype_code(dtype), "shape": list(shape),
                           "data_offsets": [at, at + n]}  # fmt: skip
            at += n
        text = json.dumps(table, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data aligned to 8 bytes, as safetensors writes it
        return len(text).to_bytes(8, "little") + text


def plan_shards(
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[Shard]:
    """Tensors in order, cut into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards = [Shard("")]
    for t in tensors:
        n = math.prod(t[2]) * t[1].itemsize
        if shards[-1].tensors and shards[-1].nbytes + n > max_shard_bytes:
            shards.append(Shard(""))
        shards[-1].tensors.append(t)
    if len(shards) == 1:
        shards[0].name = "model.safetensors"
    else:
        for i, s in enumerate(shards, 1):
            s.name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    return shards


class ShardWriter:
    """Writes the shards' staged files in order: :meth:`write` the bytes of each tensor's
    spans as they come, and :meth:`finish` checks every byte came and writes the index."""

    def __init__(self, out: Path, shards: list[Shard], metadata: dict[str, str], staged: Outputs):
        self.out, self.shards, self.metadata, self.staged = out, shards, metadata, staged
        self._i, self._left = -1, 0
        self._f: IO[bytes] | None = None
        self._queue = [(s, t) for s in shards for t in s.tensors]
        self._pos = 0

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        self._i += 1
        shard = self.shards[self._i]
        f = open(self.staged.stage(self.out / shard.name), "wb")  # noqa: SIM115 - closed later
        self._f = f
        f.write(shard.header(self.metadata))

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """The next span of tensor ``name`` (tensors in plan order, spans front to back)."""
        if self._left == 0:
            shard, (expected, dtype, shape) = self._queue[self._pos]
            if expected != name:
                raise RuntimeError(f"wrote {name!r} where {expected!r} comes next")
            self._pos += 1
            if self._i < 0 or self.shards[self._i] is not shard:
                self._open_next()
            self._left = math.prod(shape) * dtype.itemsize
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._left:
            raise RuntimeError(f"{name!r}: {data.nbytes} bytes where {self._left} are left")
        assert self._f is not None
        self._f.write(data.data)
        self._left -= data.nbytes

    def finish(self) -> list[Path]:
        """Close the last shard, write the index (several shards), return every file staged."""
        while self._pos < len(self._queue) and self._left == 0:  # empty tensors at the end
            _, (name, dtype, _) = self._queue[self._pos]
            self.write(name, torch.empty(0, dtype=dtype))
        if self._left or self._pos != len(self._queue):
            raise RuntimeError("the merge ended before every tensor was written")
        if self._f is not None:
            self._f.close()
        paths = [self.out / s.name for s in self.shards]
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards), **self.metadata},
                "weight_map": {t[0]: s.name for s in self.shards for t in s.tensors},
            }
            path = self.out / INDEX
            self.staged.stage(path).write_text(json.dumps(index, indent=2) + "\n")
            paths.append(path)
        return paths

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
