"""One average exported for inference: only that average, at the dtype it is deployed in, with
what it is written in the file's metadata.

Two functions, one per destination, both written all or none (:class:`polyak.files.Outputs`):

* :func:`save`: a safetensors file of any module's averaged ``state_dict`` (the model's own
  keys, tied tensors under each name), loadable with ``safetensors.torch.load_file``;
* :func:`save_pretrained`: a Hugging Face folder that plain ``from_pretrained`` loads, written
  by the model's own ``save_pretrained`` (same keys, config, shards); on a PEFT model an
  adapter folder that ``PeftModel.from_pretrained`` loads, holding the averaged adapter.

A cast to ``dtype`` rounds the average once (round to nearest even, as ``Tensor.to``): a bf16
export of a float32 average is ``avg.to(torch.bfloat16)`` bit for bit, at half the bytes.
Frozen parameters (not stored by the EMA: their average is themselves) come from the model.
Every safetensors file carries the metadata of :func:`metadata` (``safe_open(path,
"pt").metadata()``): the average's name and schedule, the steps and updates, the dtype and
the polyak version.

References:
    Hugging Face ``safetensors`` (file format and ``__metadata__`` header); the Bagel and
    F5-TTS issue trackers (exported averages at twice the deployed size; checkpoints stripped
    by hand).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polyak._torch import zero
from polyak._torch.naming import unwrap
from polyak.errors import NonFiniteError
from polyak.files import Outputs

if TYPE_CHECKING:
    from polyak import EMA

__all__ = ["averaged_state_dict", "metadata", "save", "save_pretrained"]

FORMAT = "polyak.export/1"
# the weight files a Hugging Face / PEFT folder may hold: an earlier export's are removed
_WEIGHT_FILES = ("model", "adapter_model", "pytorch_model")


def averaged_state_dict(
    ema: EMA, name: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The model's ``state_dict()`` holding average ``name``, as copies at ``dtype``.

    Floating tensors are cast to ``dtype`` from the average (rounded once); ``dtype=None``
    gives each tensor in the model's own dtype (what ``model.state_dict()`` holds inside
    ``ema.swapped(model)``). Integer tensors keep theirs. Tied tensors stay tied (one copy).

    Under DeepSpeed ZeRO-3 every rank calls it (the averaged partitions are gathered, and the
    inf/nan check is agreed between the ranks first), and every rank gets the full state.

    Raises:
        polyak.NonFiniteError: the average holds inf/nan (nothing to deploy); under ZeRO-3 on
            every rank when one rank's partitions do.
        TypeError: ``dtype`` is not a floating torch dtype.

    Examples:
        >>> import torch, polyak, polyak.export
        >>> ema = polyak.EMA(torch.nn.Linear(4, 2), decay=0.9)
        >>> state = polyak.export.averaged_state_dict(ema, dtype=torch.bfloat16)
        >>> sorted(state), state["weight"].dtype
        (['bias', 'weight'], torch.bfloat16)
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    model = unwrap(ema.model)
    bad = ema.nonfinite_tensors(name)
    if zero.on_any_rank(bool(bad), model):  # ZeRO-3: every rank stops, not only this one
        where = f"in {bad[:5]}" if bad else "on another rank"
        raise NonFiniteError(
            f"average {name or ema.names[0]!r} holds inf/nan {where}: nothing was exported",
            bad,
        )
    model_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    copies: dict[tuple[Any, ...], torch.Tensor] = {}
    out = {}
    with _averaged(ema, model, name) as state:
        for key, value in state.items():
            target = value.dtype if not value.is_floating_point() else dtype or model_dtypes[key]
            tie = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride(), target)
            if value.numel() == 0 or tie not in copies:
                copies[tie] = value.detach().to("cpu", target, copy=True).contiguous()
            out[key] = copies[tie]
    return out


@contextlib.contextmanager
def _averaged(ema: EMA, model: torch.nn.Module, name: str | None) -> Iterator[dict[str, Any]]:
    """The model's state dict holding the average, valid inside the block. Under DeepSpeed
    ZeRO-3 the averaged partitions are swapped in and gathered (a collective every rank joins;
    the gathered weights are freed when the block ends)."""
    if not any(zero.is_partitioned(p) for p in model.parameters()):
        yield _quietly(ema.averaged_state_dict, name)
        return
    with ema.swapped(model, name), zero.gathered(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the state dict inside swapped() is wanted
        yield model.state_dict()


def metadata(ema: EMA, name: str | None = None, dtype: torch.dtype | None = None) -> dict[str, str]:
    """The safetensors metadata written with average ``name`` (strings, as the format asks).

    ``format`` is ``"pt"`` (what ``transformers`` expects); the ``polyak.*`` keys say what the
    file holds: the format, the average's name, its schedule (JSON), the optimizer steps and
    updates it saw, the update period and start step, the dtype, and the polyak version.

    Examples:
        >>> import torch, polyak, polyak.export
        >>> ema = polyak.EMA(torch.nn.Linear(4, 2), decay=polyak.schedules.power(gamma=7))
        >>> ema.update()
        >>> meta = polyak.export.metadata(ema)
        >>> meta["polyak.schedule"], meta["polyak.updates"]
        ('{"gamma": 7.0, "kind": "power", "sigma_rel": null}', '1')
    """
    import polyak

    average = ema.names[0] if name is None else name
    if average not in ema.names:
        raise KeyError(f"no average named {name!r}; the averages are {list(ema.names)}")
    state = _quietly(ema.state_dict)
    timeline = ema.timeline
    return {
        "format": "pt",
        "polyak.format": FORMAT,
        "polyak.average": average,
        "polyak.schedule": json.dumps(state["timeline"]["schedules"][average], sort_keys=True),
        "polyak.step": str(timeline.step),
        "polyak.updates": str(timeline.num_updates),
        "polyak.update_every": str(timeline.update_every),
        "polyak.start_step": str(timeline.start_step),
        "polyak.dtype": "model" if dtype is None else str(dtype).removeprefix("torch."),
        "polyak.version": str(polyak.__version__),
    }


def save(
    ema: EMA,
    path: str | os.PathLike[str],
    name: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write average ``name`` of any module as one safetensors file (all or nothing).

    The file holds :func:`averaged_state_dict` (every key of ``model.state_dict()``) and the
    :func:`metadata`; ``model.load_state_dict(safetensors.torch.load_file(path))`` puts the
    average into a model of the same architecture.

    Args:
        ema: the :class:`polyak.EMA` (not FSDP2-sharded: gather with
            ``ema.state_dict(full=True)`` there; under DeepSpeed ZeRO-3 every rank calls it
            and each writes ``path``).
        path: the file to write (replaced atomically if it exists).
        name: the average (default: the only one).
        dtype: floating dtype of the file (default: each tensor's dtype in the model).

    Returns:
        ``path``, as a :class:`pathlib.Path`.

    Examples:
        >>> import tempfile, torch, polyak, polyak.export
        >>> from safetensors import safe_open
        >>> model = torch.nn.Linear(4, 2)
        >>> ema = polyak.EMA(model, decay=0.99)
        >>> ema.update()
        >>> path = polyak.export.save(ema, tempfile.mkdtemp() + "/avg.safetensors",
        ...                           dtype=torch.bfloat16)
        >>> with safe_open(path, "pt") as f:
        ...     f.get_tensor("weight").dtype, f.metadata()["polyak.schedule"]
        (torch.bfloat16, '{"decay": 0.99, "kind": "constant"}')
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = _untied(averaged_state_dict(ema, name, dtype))
    meta = metadata(ema, name, dtype)
    with Outputs() as out:
        save_file(tensors, str(out.stage(path)), metadata=meta)
        out.commit()
    return path


def save_pretrained(
    ema: EMA,
    directory: str | os.PathLike[str],
    name: str | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    **kwargs: Any,
) -> Path:
    """Write average ``name`` as a Hugging Face folder (all or nothing).

    A ``transformers`` model: its own ``save_pretrained`` writes the folder (keys, config,
    shards; ``kwargs`` such as ``max_shard_size`` go to it), its ``config.json`` saying
    ``dtype``, so ``AutoModel...from_pretrained(directory)`` loads the average (with
    ``dtype="auto"``: in that dtype). A PEFT model
    (``peft.PeftModel``): the adapter folder of the active adapter (or ``selected_adapters``
    in ``kwargs``) with the averaged adapter weights, which ``PeftModel.from_pretrained(base,
    directory)`` loads; the frozen base is not written. Each safetensors file carries the
    :func:`metadata`. The files are written in a temporary folder first and renamed into
    ``directory`` together; weight files of an earlier export there that this one does not
    write (``model*.safetensors``, ``adapter_model*``, ``pytorch_model*``) are removed after.

    Args:
        ema: a :class:`polyak.EMA` of a ``transformers.PreTrainedModel`` or ``peft.PeftModel``.
        directory: the folder (created if needed).
        name: the average (default: the only one).
        dtype: floating dtype of the weights (default ``torch.bfloat16``; ``None``: the
            model's own).
        **kwargs: go to the model's ``save_pretrained``, except ``is_main_process``
            (default ``True``): distributed, every rank calls this function (under DeepSpeed
            ZeRO-3 the averaged partitions are gathered, a collective), and only the rank
            passing ``is_main_process=True`` writes.

    Returns:
        ``directory``, as a :class:`pathlib.Path`.

    Examples:
        >>> ema = polyak.EMA(peft_model, decay=0.999)                  # doctest: +SKIP
        >>> polyak.export.save_pretrained(ema, "adapter-ema")          # doctest: +SKIP
        >>> PeftModel.from_pretrained(base_model, "adapter-ema")       # doctest: +SKIP
    """
    inner: Any = unwrap(ema.model)
    if not callable(getattr(inner, "save_pretrained", None)):
        raise TypeError(
            f"save_pretrained needs a transformers or PEFT model, got {type(inner).__name__}: "
            "write any module's average with polyak.export.save(ema, path)"
        )
    if "state_dict" in kwargs or "safe_serialization" in kwargs:
        raise TypeError("save_pretrained writes the average as safetensors: pass no state_dict")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot export into {directory}: it is not a directory")
    is_peft = hasattr(inner, "peft_config") and hasattr(inner, "active_adapter")
    if is_peft:
        kwargs.setdefault("selected_adapters", [inner.active_adapter])
    state = averaged_state_dict(ema, name, dtype)
    if not kwargs.pop("is_main_process", True):
        return directory  # another rank writes (the average was gathered with it)
    meta = metadata(ema, name, dtype)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".polyak-export-", dir=directory))
    try:
        inner.save_pretrained(str(staging), state_dict=state, safe_serialization=True, **kwargs)
        if dtype is not None and not is_peft and (staging / "config.json").is_file():
            _set_config_dtype(staging / "config.json", dtype)
        written = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
        with Outputs() as out:
            for rel in written:
                target = directory / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if rel.suffix == ".safetensors":
                    _with_metadata(staging / rel, meta)
                os.replace(staging / rel, out.stage(target))
            out.commit()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_stale(directory, set(written))
    return directory


def _untied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage: a copy of each repeat."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        ptr = v.data_ptr() if v.numel() else -1 - len(out)
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _with_metadata(path: Path, meta: Mapping[str, str]) -> None:
    """Rewrite the safetensors file at ``path`` with ``meta`` added to its header."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        old = f.metadata() or {}
    save_file(load_file(str(path)), str(path), metadata={**old, **meta})


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """The written ``config.json`` says what the weights are (``from_pretrained(dtype="auto")``
    loads them as such); transformers writes the model's own dtype there."""
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _quietly(fn: Any, *args: Any) -> Any:
    with warnings.catch_warnings():  # inf/nan was checked above, with a named error
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


def _remove_stale(directory: Path, written: set[Path]) -> None:
    """Remove weight files of an earlier export in ``directory`` that this one did not write:
    names of the Hugging Face / PEFT weight patterns only, regular files or symlinks (never
    followed), in ``directory`` itself and the adapters' subfolders this export wrote."""
    folders = {directory / rel.parent for rel in written}
    for folder in folders:
        with os.scandir(folder) as entries:
            stale = [
                e.name
                for e in entries
                if e.name.startswith(_WEIGHT_FILES)
                and e.name.endswith((".safetensors", ".bin", ".index.json"))
                and (folder / e.name).relative_to(directory) not in written
                and (e.is_symlink() or e.is_file(follow_symlinks=False))
            ]
        for n in stale:
            with contextlib.suppress(OSError):  # the export is complete; a leftover is harmless
                os.unlink(folder / n)
