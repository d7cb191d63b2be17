"""``merge``: the weighted average of saved checkpoints, streamed, in bounded memory.

For each tensor, span by span, the span is read from every source of non-zero weight and added
to an accumulator, ``acc += w_i x_i``, in float32 (float64 on request, or when a source is
float64), then cast and appended to its output file (:mod:`polyak.merge._engine`: a thread
reads the next span while this one is added). Memory holds a fixed budget of spans, whatever the
number and size of the checkpoints, and every input byte is read once. Integer tensors (step
counters, ``num_batches_tracked``) are copied from the latest source, never averaged.

Before any output is created, every source's tensors are checked against the latest source's
(the first missing, extra or differently shaped tensor is named, with the source and shapes),
the weights against the sources, and the output folder: it must not hold (or be) any input, nor
weight files of an earlier merge that this one would leave beside its own. A non-finite value
met while streaming stops the merge with the source and tensor named, before any output is in
place (the files are staged and only renamed into place when all are complete).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from polyak import files
from polyak._horizon import integer
from polyak.errors import CheckpointError
from polyak.merge._engine import stream
from polyak.merge._source import Source
from polyak.merge._writer import INDEX, ShardWriter, plan_shards
from polyak.merge.sources import open_sources
from polyak.merge.weights import Weights, explicit

__all__ = ["MergePlan", "MergeResult", "merge", "prepare"]

_CONFIGS = ("config.json", "generation_config.json")  # copied from the latest Hugging Face folder
_WEIGHT_FILES = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json"
)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` wrote.

    Attributes:
        out: the output folder.
        files: the files written (shards, index, configs).
        sources: each source's name, in order; ``steps`` each one's step (or ``None``).
        weights: the weights used (normalised).
        averaged, copied: the names of the tensors averaged and copied from the latest source.
        nbytes: bytes of tensor data written.
    """

    out: Path
    files: list[Path]
    sources: list[str]
    steps: list[int | None]
    weights: Weights
    averaged: list[str]
    copied: list[str]
    nbytes: int


def _floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _check_sources(sources: list[Source]) -> None:
    """Every source holds the latest one's tensors, with the same shapes and kinds."""
    latest = sources[-1]
    for s in sources[:-1]:
        missing = [n for n in latest.tensors if n not in s.tensors]
        extra = [n for n in s.tensors if n not in latest.tensors]
        if missing or extra:
            name, where, other = (missing[0], latest, s) if missing else (extra[0], s, latest)
            count = len(missing) + len(extra)
            raise CheckpointError(
                f"{other.name} has no tensor {name!r}, which {where.name} holds ({count} "
                "names differ); every checkpoint of a merge must hold the same tensors"
            )
        for n, (dtype, shape) in latest.tensors.items():
            d, sh = s.tensors[n]
            if sh != shape:
                raise CheckpointError(
                    f"tensor {n!r} has shape {list(sh)} in {s.name} but {list(shape)} in "
                    f"{latest.name}; every checkpoint of a merge must hold the same shapes"
                )
            if _floating(d) != _floating(dtype):
                raise CheckpointError(
                    f"tensor {n!r} is {d} in {s.name} but {dtype} in {latest.name}; a tensor "
                    "is averaged (floating) or copied (integer) in every checkpoint alike"
                )


def _check_out(out: Path, sources: list[Source], names: set[str]) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} is a file; give a folder")
    target = out.resolve()
    for s in sources:
        for f in s.files:
            if target == f or target in f.parents:
                raise ValueError(
                    f"the output folder {out} holds the input {f}; write the merge elsewhere "
                    "(a merge never writes over its inputs)"
                )
    if out.is_dir():
        stale = sorted(p.name for p in out.iterdir()
                       if _WEIGHT_FILES.fullmatch(p.name) and p.name not in names)  # fmt: skip
        if stale:
            raise ValueError(
                f"the output folder {out} holds {stale[0]} (of {len(stale)} weight files) that "
                "this merge would not replace, and a loader could read it with the new files; "
                "choose an empty folder or remove them"
            )


def _resolve_weights(weights: Weights | Sequence[float], sources: list[Source]) -> Weights:
    w = weights if isinstance(weights, Weights) else explicit(weights)
    if len(w) != len(sources):
        raise ValueError(
            f"{len(w)} weights for {len(sources)} checkpoints (a store counts one per "
            "snapshot); give one weight per checkpoint"
        )
    if w.steps is not None:
        for s, step in zip(sources, w.steps):
            if s.step is not None and s.step != step:
                raise ValueError(
                    f"the weights were derived for step {step}, but {s.name} is at step "
                    f"{s.step}; derive them from the checkpoints' own steps"
                )
    return w


def _metadata(sources: list[Source], w: Weights, accumulate: torch.dtype) -> dict[str, str]:
    import polyak

    info = {
        "polyak": polyak.__version__,
        "method": w.label,
        "fit": w.fit,
        "accumulate": str(accumulate).removeprefix("torch."),
        "sources": [s.name for s in sources],
        "steps": [s.step for s in sources],
        "weights": [float(x) for x in w.values],
    }
    meta = {"format": "pt", "polyak.merge": json.dumps(info)}
    if sources[-1].step is not None:
        meta["step"] = str(sources[-1].step)  # a merge read back as a source keeps its step
    return meta


def merge(
    sources: Sequence[str | Path | Source],
    weights: Weights | Sequence[float],
    out: str | Path,
    dtype: torch.dtype | None = None,
    *,
    accumulate: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 << 30,
    steps: Sequence[int] | None = None,
) -> MergeResult:
    """Write ``sum_i weights[i] * sources[i]`` to the folder ``out`` in the Hugging Face layout.

    Floating tensors are averaged: ``theta = sum_i w_i theta_i`` with the weights normalised
    to sum to 1 (:func:`polyak.merge.weights.explicit` for a plain list), accumulated in
    ``accumulate`` (float32; float64 on request or for float64 sources). Integer tensors are
    copied from the latest (last) source. See the module docstring for the checks made before
    anything is written and for the memory bound.

    Args:
        sources: paths or opened :class:`~polyak.merge.Source` objects, in step order (see
            :func:`~polyak.merge.open_sources` for the kinds; a store gives one per snapshot).
            Paths are opened and closed here.
        weights: one per source: :class:`~polyak.merge.weights.Weights` (``lawa``, ``ema``,
            ``power``, ``wsm``) or numbers (normalised; negative or NaN refused).
        out: the output folder (created). Never one that holds an input.
        dtype: the output's floating dtype (default: each tensor's dtype in the latest source).
        accumulate: torch.float32 or torch.float64.
        max_shard_bytes: the largest shard (a tensor larger than that gets its own).
        steps: the step of each source, where the sources do not carry it (or to override).

    Returns:
        :class:`MergeResult` (files written, weights, the tensors averaged and copied).

    Raises:
        CheckpointError: an unreadable source or one whose tensors differ (named).
        NonFiniteError: a source holds inf/nan in a tensor averaged (named); nothing written.
        ValueError: bad weights, dtype or output folder.

    Examples:
        >>> import tempfile, pathlib, torch
        >>> from safetensors.torch import save_file, load_file
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(3):  # three checkpoints of a run
        ...     state = {"w": torch.full((2,), float(i)), "n": torch.tensor(i)}
        ...     save_file(state, d / f"{i}.safetensors")
        >>> result = merge([d / f"{i}.safetensors" for i in range(3)], [1, 1, 2], d / "merged")
        >>> load_file(d / "merged" / "model.safetensors")
        {'n': tensor(2), 'w': tensor([1.2500, 1.2500])}
    """
    given = [s for s in sources if isinstance(s, Source)]
    if given and len(given) != len(sources):
        raise TypeError("give the sources as paths or as opened Sources, not both")
    if given and steps is not None:
        raise ValueError("steps= goes with paths; set Source.step on opened sources")
    opened = given or open_sources([s for s in sources if not isinstance(s, Source)], steps)
    try:
        plan = prepare(opened, weights, out, dtype, accumulate=accumulate,
                       max_shard_bytes=max_shard_bytes)  # fmt: skip
        return plan.run()
    finally:
        if not given:
            for s in opened:
                s.close()


class MergePlan:
    """A merge checked and ready to run (:func:`prepare`): nothing read or written yet.

    Attributes:
        sources, weights, out: as given (the weights normalised).
        tensors: ``(name, output dtype, shape)`` of every tensor, in the order written.
        nbytes: bytes of tensor data the merge will write.
    """

    def __init__(
        self,
        sources: list[Source],
        weights: Weights,
        out: Path,
        dtype: torch.dtype | None,
        accumulate: torch.dtype,
        max_shard_bytes: int,
    ) -> None:
        self.sources, self.weights, self.out = sources, weights, out
        self._dtype, self._accumulate = dtype, accumulate
        latest = sources[-1]
        self.tensors = [
            (n, (dtype or d) if _floating(d) else d, shape)
            for n, (d, shape) in latest.tensors.items()
        ]
        self._shards = plan_shards(self.tensors, max_shard_bytes)
        self.nbytes = sum(s.nbytes for s in self._shards)
        folder = latest.folder
        self._configs = [] if folder is None else [c for c in _CONFIGS if (folder / c).is_file()]
        names = {s.name for s in self._shards} | set(self._configs)
        _check_out(out, sources, names | ({INDEX} if len(self._shards) > 1 else set()))

    def run(self) -> MergeResult:
        """Stream the merge into staged files and put them in place together."""
        latest, w = self.sources[-1], self.weights
        self.out.mkdir(parents=True, exist_ok=True)
        with files.Outputs() as staged:
            meta = _metadata(self.sources, w, self._accumulate)
            writer = ShardWriter(self.out, self._shards, meta, staged)
            try:
                averaged, copied = stream(
                    self.tensors, self.sources, w.values, self._accumulate, writer.write
                )
                written = writer.finish()
            finally:
                writer.close()
            for c in self._configs:
                assert latest.folder is not None  # configs come from a folder
                written.append(_copy_config(latest.folder / c, self.out / c, self._dtype, staged))
            staged.commit()
        return MergeResult(self.out, written, [s.name for s in self.sources],
                           [s.step for s in self.sources], w, averaged, copied,
                           self.nbytes)  # fmt: skip


def prepare(
    sources: Sequence[Source],
    weights: Weights | Sequence[float],
    out: str | Path,
    dtype: torch.dtype | None = None,
    *,
    accumulate: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 << 30,
) -> MergePlan:
    """Every check of :func:`merge` on opened sources (their headers only), nothing written.

    ``prepare(...).run()`` is :func:`merge`; a program checks everything first this way, then
    runs. Raises what :func:`merge` raises before it reads a tensor.
    """
    if accumulate not in (torch.float32, torch.float64):
        raise TypeError(f"accumulate must be torch.float32 or torch.float64, got {accumulate!r}")
    if dtype is not None and dtype not in _FLOATS:
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    opened = list(sources)
    if not opened:
        raise ValueError("no checkpoints given")
    w = _resolve_weights(weights, opened)
    _check_sources(opened)
    max_shard_bytes = integer("max_shard_bytes", max_shard_bytes, 1)
    return MergePlan(opened, w, Path(out), dtype, accumulate, max_shard_bytes)


def _copy_config(src: Path, dst: Path, dtype: torch.dtype | None, staged: files.Outputs) -> Path:
    """A Hugging Face config, read as untrusted JSON, with the output dtype when one is given."""
    data = files.read_json(src, max_bytes=16 << 20)
    if not isinstance(data, dict):
        raise CheckpointError(f"{src} is not a JSON object")
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in data:
                data[key] = str(dtype).removeprefix("torch.")
    staged.stage(dst).write_text(json.dumps(data, indent=2) + "\n")
    return dst
