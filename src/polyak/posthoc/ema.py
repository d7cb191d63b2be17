"""``PostHocEMA``: keep EDM2's power averages during training and store snapshots of them."""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polyak import schedules
from polyak._horizon import SIGMA_REL_MAX, integer, real_in
from polyak._torch.ema import EMA
from polyak._warn import warn
from polyak.errors import CheckpointError
from polyak.posthoc import store
from polyak.posthoc.manifest import RUN_ID
from polyak.posthoc.writer import Retention, SnapshotWriteError, SnapshotWriter
from polyak.types import EMAOptions, TensorLayout

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["PostHocEMA"]

_FORMAT = "polyak.PostHocEMA"
_VERSION = 1
LIVE = "live"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _distributed() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shared_run_id() -> str:
    """A new run id, the same on every rank (rank 0's, broadcast) under torch.distributed."""
    run_id = store.new_run_id()
    if _distributed()[1] > 1:
        box = [run_id]
        torch.distributed.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id


class PostHocEMA:
    """EDM2 post-hoc EMA: power averages kept during training, snapshots written to a store.

    Owns a :class:`polyak.EMA` (``.ema``) with one power-function average per ``sigma_rel``
    (:func:`polyak.schedules.power`; per optimizer step ``avg <- d avg + (1-d) live`` with
    ``d = (1 - dt/t)**(gamma+1)``), so ``update_every``, bf16 models, FSDP2 shards and exact
    resume behave as in ``EMA``. Every ``snapshot_every`` optimizer steps the averages are
    copied to host memory (in ``snapshot_dtype``) and written in a background thread, one
    safetensors file per average, atomically, with a manifest (run id, steps, ``sigma_rel``,
    CRC-32 per file). After training, :func:`polyak.posthoc.reconstruct` gives the average of
    *any* ``sigma_rel`` (or constant decay) as a least-squares combination of the snapshots.

    A store belongs to one run: a new run refuses (``ForeignRunError``, at its first snapshot) to
    write into a directory holding another run's manifest; a run resumed with
    :meth:`load_state_dict` appends to its own store, replacing snapshots written after the
    state it resumed from. Under FSDP2 every rank writes its own shards (``manifest.rank{r}``);
    with DDP (replicated averages) only rank 0 writes.

    Args:
        model: the model being trained (see :class:`polyak.EMA`).
        directory: the store (created at the first snapshot).
        sigma_rels: EDM2 relative widths of the averages kept (EDM2: 0.05 and 0.10).
        snapshot_every: take a snapshot when the optimizer step reaches a multiple of this.
        snapshot_dtype: dtype of the files. float16 (EDM2's choice) halves the disk and the
            reading time and adds ~3e-4 of the largest weight to a reconstruction within the
            stored widths (more for narrower targets: ``reconstruct`` warns).
        keep_live: also store the live weights of the snapshot's step (read from the model
            when the snapshot is taken) for :func:`polyak.posthoc.window_average`: one more
            file per snapshot, nothing kept between snapshots.
        retention: :class:`Retention` to thin old snapshots, or ``None`` to keep all.
        **ema_kwargs: passed to :class:`polyak.EMA` (``update_every``, ``buffers``, ``dtype``,
            ``include``/``exclude``, ``start_step``, ...), except ``decay``.

    Examples:
        >>> import tempfile, torch, polyak
        >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
        >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10)
        >>> for step in range(100):  # after each optimizer step
        ...     ph.update()
        >>> ph.close()  # waits for the last write
        >>> [s["step"] for s in polyak.posthoc.list_snapshots(store).snapshots]
        [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
        >>> avg = polyak.posthoc.reconstruct(store, sigma_rel=0.08)
        >>> model.load_state_dict(avg)
        <All keys matched successfully>
        >>> with ph.swapped(sigma_rel=0.05):  # an average kept, by its sigma_rel
        ...     y = model(torch.ones(1, 3))
        >>> ph.averages  # the name of each in ph.ema
        {0.05: 'power(sigma_rel=0.05)', 0.1: 'power(sigma_rel=0.1)'}

    References:
        Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
        CVPR 2024, Sec. 3.
    """

    def __init__(
        self,
        model: nn.Module,
        directory: str | Path,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every: int = 1000,
        snapshot_dtype: torch.dtype = torch.float16,
        keep_live: bool = False,
        retention: Retention | None = None,
        **ema_kwargs: Unpack[EMAOptions],
    ) -> None:
        if importlib.util.find_spec("safetensors") is None:
            raise ImportError(
                'PostHocEMA writes safetensors files: pip install "polyak[torch]" (or safetensors)'
            )
        if "decay" in ema_kwargs:
            raise TypeError("PostHocEMA chooses the decays (one power schedule per sigma_rel)")
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
            raise TypeError(f"sigma_rels must be a sequence of floats, got {sigma_rels!r}")
        rels = [
            real_in("sigma_rel", s, 0.0, SIGMA_REL_MAX, lo_open=True, hi_open=True)
            for s in sigma_rels
        ]
        if not rels or len(set(rels)) != len(rels):
            raise ValueError(f"sigma_rels must be distinct and not empty, got {sigma_rels!r}")
        if not isinstance(snapshot_dtype, torch.dtype) or not snapshot_dtype.is_floating_point:
            raise TypeError(
                f"snapshot_dtype must be a floating torch.dtype, got {snapshot_dtype!r}"
            )
        if not isinstance(keep_live, bool):
            raise TypeError(f"keep_live must be True or False, got {keep_live!r}")
        if retention is not None and not isinstance(retention, Retention):
            raise TypeError(
                f"retention must be a polyak.posthoc.Retention or None, got {retention!r}"
            )
        self.snapshot_every = integer("snapshot_every", snapshot_every, 1)
        self.snapshot_dtype = snapshot_dtype
        self.keep_live = keep_live
        self.retention = retention
        self.directory = Path(directory)
        power = {f"sigma{s:g}": (s, schedules.power(sigma_rel=s)) for s in rels}
        # key in the store -> (name of the EMA's average, sigma_rel, gamma)
        self._averages = {
            key: (p.name, s, schedules.sigma_rel_to_gamma(s)) for key, (s, p) in power.items()
        }
        self.ema = EMA(model, {p.name: p for _, p in power.values()}, **ema_kwargs)
        self.sigma_rels = tuple(rels)
        self.run_id = _shared_run_id()
        self._writer: SnapshotWriter | None = None
        self._writes = True  # False on DDP ranks other than 0 (rank 0 writes)
        self._staging: dict[str, dict[str, torch.Tensor]] | None = None
        self._last_snapshot: int | None = None

    # ------------------------------------------------------------------ the averages kept
    @property
    def averages(self) -> dict[float, str]:
        """``{sigma_rel: name}`` of the averages kept, the names ``ph.ema`` knows them by
        (``ph.ema.get_module(ph.averages[0.05])``)."""
        return {rel: name for name, rel, _ in self._averages.values()}

    def name_of(self, sigma_rel: float) -> str:
        """The name in ``ph.ema`` of the average kept with this ``sigma_rel``.

        Raises:
            KeyError: no average of that ``sigma_rel`` is kept (the message lists them).
        """
        for rel, name in self.averages.items():
            if isinstance(sigma_rel, (int, float)) and math.isclose(rel, sigma_rel, rel_tol=1e-9):
                return name
        raise KeyError(
            f"no average of sigma_rel={sigma_rel!r} is kept; the averages kept have sigma_rel "
            f"{', '.join(f'{r:g}' for r in self.sigma_rels)} (reconstruct any other with "
            "polyak.posthoc.reconstruct)"
        )

    @contextlib.contextmanager
    def swapped(
        self, model: nn.Module | None = None, *, sigma_rel: float | None = None
    ) -> Iterator[nn.Module]:
        """``ph.ema.swapped(model, name)`` for the average kept with ``sigma_rel`` (needed
        when more than one is kept): the model evaluates with it inside the block."""
        name = None if sigma_rel is None else self.name_of(sigma_rel)
        with self.ema.swapped(model, name) as swapped:
            yield swapped

    def averaged_state_dict(self, sigma_rel: float | None = None) -> dict[str, torch.Tensor]:
        """``ph.ema.averaged_state_dict(name)`` for the average kept with ``sigma_rel``."""
        return self.ema.averaged_state_dict(None if sigma_rel is None else self.name_of(sigma_rel))

    # ------------------------------------------------------------------ training
    def update(self, model: nn.Module | None = None, *, steps: int = 1) -> None:
        """:meth:`polyak.EMA.update`, then a snapshot when the step reaches a multiple of
        ``snapshot_every``. Raises :class:`SnapshotWriteError` if the previous write failed."""
        before = self.ema.step
        self.ema.update(model, steps=steps)
        if self.ema.step // self.snapshot_every > before // self.snapshot_every:
            self.snapshot()

    def snapshot(self) -> int:
        """Copy the averages to host memory now and write them in the background.

        Blocks only for the copy (and for the previous write, if it is still running). Returns
        the step of the snapshot; a second call at the same step does nothing. If the previous
        write failed, this snapshot is still taken and then that failure is raised
        (:class:`SnapshotWriteError`).
        """
        step = self.ema.step
        if step == self._last_snapshot:
            return step
        layout = self.ema.layout()
        writer = self._writer or self._make_writer(layout)
        if writer is None:  # a DDP rank other than 0: rank 0 writes the replicated averages
            self._last_snapshot = step
            return step
        failed: SnapshotWriteError | None = None
        try:
            writer.wait()  # the staging buffers are free again
        except SnapshotWriteError as e:
            failed = e
        payload = self._stage(layout)
        timeline = self.ema.timeline
        writer.submit(step, timeline.last_update_step - timeline.start_step, payload)
        self._last_snapshot = step
        if failed is not None:
            raise failed
        return step

    def wait(self) -> None:
        """Wait until the last snapshot is on disk (raises if its write failed)."""
        if self._writer is not None:
            self._writer.wait()

    close = wait

    def __enter__(self) -> PostHocEMA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_writer(self, layout: dict[str, TensorLayout]) -> SnapshotWriter | None:
        rank, world = _distributed()
        flat = [n for n, t in layout.items() if t.flat_offset is not None]
        if flat:
            raise ValueError(
                f"PostHocEMA stores blocks of tensors, and {flat[:3]} are DeepSpeed ZeRO-3 "
                "partitions (flat slices); keep a polyak.EMA with the power-function decays "
                "under ZeRO-3, or take post-hoc snapshots on a ZeRO-1/2 or FSDP2 run"
            )
        sharded = any(t.sharded for t in layout.values())
        if not self._writes or (world > 1 and not sharded and rank != 0):
            self._writes = False
            return None
        stored = _dtype_name(self.snapshot_dtype)
        tensors = {
            name: {
                "shape": list(t.shape),
                "kind": t.kind,
                "dtype": stored if t.kind == "average" else _dtype_name(t.dtype),
                "shard": _shard(t) if t.sharded else None,
            }
            for name, t in layout.items()
        }
        header = {
            "run_id": self.run_id,
            "rank": rank if sharded else 0,
            "world_size": world if sharded else 1,
            "sharded": sharded,
            "snapshot_dtype": _dtype_name(self.snapshot_dtype),
            "start_step": self.ema.timeline.start_step,
            "live": self.keep_live,
            "averages": {
                key: {"sigma_rel": rel, "gamma": gamma, "name": name}
                for key, (name, rel, gamma) in self._averages.items()
            },
            "tensors": tensors,
        }
        self._writer = SnapshotWriter(self.directory, header, self.snapshot_every, self.retention)
        return self._writer

    def _stage(self, layout: dict[str, TensorLayout]) -> dict[str, dict[str, torch.Tensor]]:
        """Host copies of every file's tensors, in buffers reused across snapshots: each
        average (in ``snapshot_dtype``) with the copied tensors, and, with ``keep_live``, the
        model's tensors read now (this rank's shards under FSDP2), copied ones included. Reads
        the averages' own views (no state dict, no check: the writer checks the host copies,
        once, off the training thread)."""
        copied_names = [n for n, t in layout.items() if t.kind == "copied"]
        sources: dict[str, dict[str, torch.Tensor]] = {}
        for key, (name, _, _) in self._averages.items():
            views = self.ema.averaged_tensors(name)
            sources[key] = {n: v for n, v in views.items() if layout[n].kind == "average"}
        copied = {n: views[n] for n in copied_names}
        if self.keep_live:
            live = self.ema.live_tensors()
            sources[LIVE] = {n: live[n] for n in layout}
        sources["copied"] = copied
        pin = torch.cuda.is_available()
        if self._staging is None:
            self._staging = {
                key: {
                    n: torch.empty(
                        t.shape,
                        dtype=t.dtype if n in copied else self.snapshot_dtype,
                        pin_memory=pin,
                    )
                    for n, t in table.items()
                }
                for key, table in sources.items()
            }
        with torch.no_grad():
            for key, table in sources.items():
                for n, t in table.items():
                    self._staging[key][n].copy_(t, non_blocking=pin)
            if pin:
                torch.cuda.synchronize()
        payload = {key: {**self._staging[key], **self._staging["copied"]} for key in self._averages}
        if self.keep_live:
            payload[LIVE] = self._staging[LIVE]
        return payload

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The EMA's state plus the run id and snapshot settings (resume appends to the store)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "ema": self.ema.state_dict(),
            "run_id": self.run_id,
            **self._settings(),
            "snapshot_every": self.snapshot_every,
            "last_snapshot": self._last_snapshot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: load the EMA and take over the run id, so snapshots append to its store.

        All checks come first; on an error nothing changes. Waits for a write in progress.
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} state dict (format={_get(state, 'format')!r})")
        if state.get("version") != _VERSION:
            raise ValueError(f"{_FORMAT} state version {state.get('version')!r} != {_VERSION}")
        for field, ours in self._settings().items():
            if state.get(field) != ours:
                raise ValueError(
                    f"the state was saved with {field}={state.get(field)!r}, this PostHocEMA has "
                    f"{field}={ours!r}; construct it with the run's settings"
                )
        run_id = state.get("run_id")
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            raise CheckpointError(
                f"the state's run_id must be 16 hexadecimal digits (a PostHocEMA's own), got "
                f"{run_id!r}: it names the store's files, so no other value is accepted; load "
                "the state this PostHocEMA saved"
            )
        last = state.get("last_snapshot")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise CheckpointError(
                f"the state's last_snapshot must be a step (an integer >= 0) or None, got {last!r}"
            )
        if state.get("snapshot_every") != self.snapshot_every:
            warn(
                f"snapshot_every was {state.get('snapshot_every')} when saved, keeping "
                f"{self.snapshot_every}"
            )
        self.wait()
        self.ema.load_state_dict(state["ema"])
        self.run_id = run_id
        self._writer = None  # the next snapshot opens the run's own store
        self._last_snapshot = last

    def _settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the state it loads."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "keep_live": self.keep_live,
            "snapshot_dtype": _dtype_name(self.snapshot_dtype),
        }

    def __repr__(self) -> str:
        return (
            f"PostHocEMA(sigma_rels={self.sigma_rels}, directory={str(self.directory)!r}, "
            f"snapshot_every={self.snapshot_every}, step={self.ema.step}, run_id={self.run_id!r})"
        )


def _shard(t: TensorLayout) -> dict[str, list[int]]:
    """The manifest's record of where a shard sits in its full tensor."""
    return {
        "global_shape": list(t.global_shape),
        "offset": list(t.offset),
        "local_shape": list(t.shape),
    }


def _get(state: object, key: str) -> object:
    return state.get(key) if isinstance(state, dict) else type(state).__name__
