"""One checkpoint as a merge sees it: tensor names, dtypes and shapes, a step, reads of spans."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from polyak.errors import CheckpointError

__all__ = ["Reader", "Source", "check_tensor"]

Reader = Callable[[str, int, int, bytearray], torch.Tensor]


class Source:
    """One checkpoint: its tensors (names, dtypes, shapes), its step, and reads of any span.

    Attributes:
        name: the path (and ``::selector``) it was opened from, for messages.
        kind: ``"hf"``, ``"safetensors"``, ``"torch"``, ``"lightning"``, ``"ema"``, ``"store"``.
        step: the optimizer step it was saved at, or ``None`` where the source does not say.
        gamma: for a snapshot of a power average (a post-hoc store), its exponent; else ``None``.
        tensors: ``{name: (dtype, shape)}``, in the order they are stored.
        files: the files it reads (resolved), so that a merge never writes over one.
        folder: the Hugging Face folder it came from (its ``config.json`` goes with a merge).
    """

    def __init__(
        self,
        name: str,
        kind: str,
        step: int | None,
        tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        read: Reader,
        files: list[Path],
        close: Callable[[], None] = lambda: None,
        gamma: float | None = None,
    ) -> None:
        self.name, self.kind, self.step, self.gamma = name, kind, step, gamma
        self.tensors, self.files = tensors, files
        self.folder: Path | None = None
        self._read, self._close = read, close

    def read(self, name: str, begin: int, end: int, buffer: bytearray) -> torch.Tensor:
        """Elements ``[begin, end)`` of tensor ``name``, flattened: a view of ``buffer`` (large
        enough for them) or of the source's own memory map."""
        return self._read(name, begin, end, buffer)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        n = len(self.tensors)
        return f"Source({self.name!r}, kind={self.kind!r}, step={self.step}, tensors={n})"


def check_tensor(value: Any, name: str, where: str) -> torch.Tensor:
    """``value`` if it is a dense CPU tensor with data, else a named error."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: {name!r} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided or value.device.type != "cpu" or value.is_complex():
        raise CheckpointError(
            f"{where}: {name!r} is a {value.layout} {value.dtype} tensor on {value.device}; a "
            "merge reads dense real tensors"
        )
    return value
