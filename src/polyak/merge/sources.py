"""The checkpoints a merge reads, of every kind, opened as untrusted input.

:func:`open_sources` turns paths into :class:`Source` objects: each one checkpoint (a store
gives one per snapshot), with its tensors' names, dtypes and shapes known from the headers
alone, a step where the source carries one, and :meth:`Source.read` to read any span of a
tensor when the merge needs it. Kinds, by what the path is:

* a Hugging Face folder: ``model.safetensors``, or the shards its
  ``model.safetensors.index.json`` names (plain names inside the folder), or
  ``pytorch_model.bin`` (and its index); the step from ``trainer_state.json``'s
  ``global_step``, else from a ``checkpoint-N`` name;
* a ``.safetensors`` file (the step from its metadata's ``step``, if any);
* a ``.pt``/``.pth``/``.bin`` state dict, a Lightning ``.ckpt`` (its ``state_dict``, the step
  from ``global_step``), or a polyak ``EMA.state_dict()`` file (one average: ``PATH::NAME`` when
  it keeps several; the step from its timeline), all read with ``torch.load(weights_only=True,
  mmap=True)``: no pickled code runs, and the tensors stay in the file until read;
* a polyak post-hoc store (:mod:`polyak.posthoc`): its live snapshots
  (``PostHocEMA(keep_live=True)``), or ``DIR::sigma_rel=S`` the snapshots of one average kept,
  ``DIR::averages`` those of all (each file's CRC is checked first: one more read of it).

Everything read is checked (:mod:`polyak.files`): JSON bounded, every file a regular file inside
its folder, every header entry consistent; a violation is a :class:`polyak.CheckpointError`
naming the file and the field or tensor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from polyak import files
from polyak.errors import CheckpointError
from polyak.merge import _torchfile
from polyak.merge._safetensors import SafetensorsFile
from polyak.merge._source import Source

__all__ = ["Source", "open_sources"]

_JSON_BYTES = 64 << 20  # an index or trainer_state.json (its log history grows with the run)
_CHECKPOINT = re.compile(r"checkpoint-(0|[1-9][0-9]{0,15})")
_SELECTOR = "::"


def _safetensors_source(
    name: str, kind: str, step: int | None, parts: dict[str, SafetensorsFile], order: list[str]
) -> Source:
    """A source over tensors spread across safetensors files (``parts``: tensor -> file)."""
    opened = list({id(f): f for f in parts.values()}.values())

    def read(tensor: str, begin: int, end: int, buffer: bytearray) -> torch.Tensor:
        return parts[tensor].read(tensor, begin, end, buffer)

    def close() -> None:
        for f in opened:
            f.close()

    tensors = {n: (parts[n].entries[n].dtype, parts[n].entries[n].shape) for n in order}
    return Source(name, kind, step, tensors, read, [f.path.resolve() for f in opened], close)


def _open_safetensors(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(files.open_regular(path.parent, path.name), path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None


def _file_order(f: SafetensorsFile) -> list[str]:
    """Tensor names in the order of their bytes (reads then go front to back)."""
    return sorted(f.entries, key=lambda n: (f.entries[n].begin, n))


def _metadata_step(f: SafetensorsFile) -> int | None:
    step = f.metadata.get("step")
    return int(step) if step is not None and step.isdecimal() and len(step) < 19 else None


def _index(folder: Path, name: str, suffix: str) -> dict[str, str]:
    """``weight_map`` of an index: tensor -> shard file (a plain name inside ``folder``)."""
    path = folder / name
    data = files.read_json(path, max_bytes=_JSON_BYTES)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{path}: 'weight_map' must be an object of tensor -> file names")
    for tensor, shard in wmap.items():
        files.plain_name(shard, what=f"weight_map[{tensor!r}]", where=path,
                         pattern=rf".+\.{suffix}")  # fmt: skip
    return wmap


def _trainer_step(folder: Path) -> int | None:
    """The step a Hugging Face checkpoint folder was saved at, or ``None``."""
    named = _CHECKPOINT.fullmatch(folder.name)
    path = folder / "trainer_state.json"
    if not path.exists():
        return int(named.group(1)) if named else None
    files.regular_file(folder, path.name, what="trainer state")
    data = files.read_json(path, max_bytes=_JSON_BYTES)
    step = data.get("global_step") if isinstance(data, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'global_step' must be an integer >= 0, got {step!r:.40}")
    if named and int(named.group(1)) != step:
        raise CheckpointError(
            f"{path}: 'global_step' is {step}, but the folder is named {folder.name}; which one "
            "is the checkpoint's step? Rename the folder or give the steps explicitly"
        )
    return step


def _hf_folder(folder: Path) -> Source:
    source = _hf_weights(folder, _trainer_step(folder))
    source.folder = folder
    return source


def _hf_weights(folder: Path, step: int | None) -> Source:
    name = str(folder)
    if (folder / "model.safetensors.index.json").exists():
        wmap = _index(folder, "model.safetensors.index.json", "safetensors")
        shards: dict[str, SafetensorsFile] = {}
        parts: dict[str, SafetensorsFile] = {}
        try:
            for tensor, shard in wmap.items():
                if shard not in shards:
                    shards[shard] = _open_safetensors(folder / shard)
                if tensor not in shards[shard].entries:
                    raise CheckpointError(
                        f"{folder / shard} lacks tensor {tensor!r}, which "
                        "model.safetensors.index.json places there"
                    )
                parts[tensor] = shards[shard]
        except BaseException:
            for f in shards.values():
                f.close()
            raise
        order = [n for f in shards.values() for n in _file_order(f) if parts.get(n) is f]
        return _safetensors_source(name, "hf", step, parts, order)
    if (folder / "model.safetensors").exists():
        f = _open_safetensors(folder / "model.safetensors")
        return _safetensors_source(name, "hf", step, dict.fromkeys(f.entries, f), _file_order(f))
    if (folder / "pytorch_model.bin.index.json").exists():
        wmap = _index(folder, "pytorch_model.bin.index.json", "bin")
        return _torchfile.sharded(folder, wmap, name, step)
    if (folder / "pytorch_model.bin").exists():
        return _torchfile.open_file(folder / "pytorch_model.bin", None, name, "hf", step)
    raise CheckpointError(
        f"{folder} holds no model weights (model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin) and no post-hoc store manifest"
    )


def _one(path: Path, selector: str | None) -> list[Source]:
    from polyak.posthoc.store import find_manifests

    if path.is_dir():
        if find_manifests(path):
            from polyak.merge._store import store_sources

            return store_sources(path, selector)
        if selector is not None:
            raise ValueError(
                f"{path}{_SELECTOR}{selector}: a selector goes with a store or an EMA file"
            )
        return [_hf_folder(path)]
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        if selector is not None:
            raise ValueError(f"{path}{_SELECTOR}{selector}: a safetensors file takes no selector")
        f = _open_safetensors(path)
        return [_safetensors_source(str(path), "safetensors", _metadata_step(f),
                                    dict.fromkeys(f.entries, f), _file_order(f))]  # fmt: skip
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return [_torchfile.open_file(path, selector, str(path), None, None)]
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    raise CheckpointError(
        f"{path}: not a checkpoint polyak can read (a Hugging Face folder, a post-hoc store, "
        "a .safetensors, .pt, .pth, .bin or .ckpt file)"
    )


def _split(spec: str | Path) -> tuple[Path, str | None]:
    text = str(spec)
    if _SELECTOR in text and not Path(text).exists():
        head, _, selector = text.rpartition(_SELECTOR)
        return Path(head), selector
    return Path(text), None


def open_sources(paths: Sequence[str | Path], steps: Sequence[int] | None = None) -> list[Source]:
    """Open every checkpoint (a store gives one source per snapshot), checking all headers.

    Args:
        paths: checkpoints in step order (see the module docstring for the kinds), each
            optionally ``PATH::SELECTOR`` (an EMA file's average, a store's average).
        steps: the step of each source (after a store's expansion), overriding what the
            sources say.

    Returns:
        The sources, open (close each, or use :func:`polyak.merge.merge`, which does).

    Raises:
        CheckpointError: a path that does not exist, is not a checkpoint, or holds malformed
            data (named). ValueError: a bad selector or ``steps``.
    """
    if isinstance(paths, (str, Path)):
        raise TypeError("paths must be a sequence of paths (one per checkpoint), not one path")
    out: list[Source] = []
    try:
        for spec in paths:
            path, selector = _split(spec)
            out += _one(path, selector)
        if not out:
            raise ValueError("no checkpoints given")
        if steps is not None:
            given = [int(s) for s in steps]
            if len(given) != len(out):
                raise ValueError(
                    f"{len(given)} steps given for {len(out)} checkpoints (a store counts one "
                    "per snapshot); give one step per checkpoint"
                )
            for source, step in zip(out, given):
                source.step = step
    except BaseException:
        for s in out:
            s.close()
        raise
    return out
