"""``polyak.EMA``: averages of a PyTorch model's weights in flat fp32 storage."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from polyak._timeline import Timeline
from polyak._torch.ema_state import StateMixin
from polyak._torch.ema_use import UseMixin
from polyak._torch.naming import is_uninitialized, select_tensors, unwrap
from polyak._torch.sharding import ShardInfo, fsdp_modules, reshard, shard_info
from polyak._torch.storage import FlatStorage
from polyak._torch.update import DirectGroup, StagedGroup
from polyak._torch.views import SwapState

__all__ = ["EMA"]

_FORMAT = "polyak.EMA"
_VERSION = 1
_LOW_PRECISION = {torch.bfloat16: 8, torch.float16: 11}  # significant bits


class EMA(UseMixin, StateMixin):
    """Exponential moving averages of a model's weights, kept outside the model.

    After each optimizer step, :meth:`update` applies to every tracked tensor of every average

        avg <- avg + (1 - decay_t) * (live - avg)        (= decay_t*avg + (1-decay_t)*live)

    in the average's dtype, with ``decay_t`` from the average's schedule over the optimizer steps
    since its last update (DESIGN.md rules 1-2). The average starts as a copy of the weights.

    Storage: the averages live in one contiguous buffer per (device, dtype), with a view per
    tensor; building an ``EMA`` copies the weights once and never deep-copies the model, so
    wrapped (DDP, ``torch.compile``) and lazily initialised models work. An update is one
    ``torch._foreach_lerp_`` per group and average, allocates nothing, and never syncs with the
    device (the step counter is a Python int).

    Precision: averages are float32 by default, also for a bfloat16/float16 model (whose own
    precision freezes an EMA: at decay 0.9999 a bf16 average cannot move unless the weights are
    ~40x away; peers.md pain point 3). A float64 model keeps a float64 average. Lower precision is
    an explicit opt-in (``dtype=torch.bfloat16``) and warns.

    Tensors: floating parameters are averaged; floating buffers are averaged
    (``buffers="average"``, as EMAN / timm), copied from the model (``"copy"``) or left out
    (``"ignore"``); integer buffers (``num_batches_tracked``) are always copied, never averaged.
    Names are canonical (``module.``, ``_orig_mod.`` stripped); ``include``/``exclude`` take glob
    patterns over them.

    Args:
        model: the model being trained (possibly wrapped by DDP or ``torch.compile``).
        decay: a float, a schedule from :mod:`polyak.schedules`, or a sequence / dict of them
            to keep several averages at once.
        buffers: ``"average"``, ``"copy"`` or ``"ignore"`` for floating buffers.
        include: glob pattern(s); only matching tensors are tracked.
        exclude: glob pattern(s) of tensors not to track.
        dtype: dtype of the averages (default float32, which a float64 model raises to
            float64); ``torch.bfloat16``/``torch.float16`` store them in low precision (warns).
        device: device of the averages (default: each tensor's own device).
        update_every: average every this many optimizer steps; the schedule is applied over the
            whole gap (``decay**k``) so the horizon does not change (unlike ema-pytorch).
        start_step: updates at optimizer steps ``<= start_step`` copy the weights.

    Example:
        >>> import torch, polyak
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ema = polyak.EMA(model, decay=0.999)
        >>> loss = model(torch.randn(8, 4)).square().mean(); loss.backward(); opt.step()
        >>> ema.update()
        >>> with ema.swapped(model):          # evaluate with the averaged weights
        ...     _ = model(torch.randn(1, 4))

    References:
        Morales-Brotons, Vogels & Hendrikx, TMLR 2024 (EMA of weights, BN handling);
        Cai et al. 2021 (EMAN: averaging BN statistics); Karras et al. 2024 (EDM2, power EMA).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: Any = 0.999,
        *,
        buffers: str = "average",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        update_every: int = 1,
        start_step: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._timeline = Timeline(decay, update_every=update_every, start_step=start_step)
        self._policy = (buffers, include, exclude)
        self._dtype = dtype
        self._device = None if device is None else torch.device(device)
        if dtype in _LOW_PRECISION:
            bits = _LOW_PRECISION[dtype]
            warnings.warn(
                f"averages stored in {dtype}: an update is lost when (1-decay)*|live-avg| is "
                f"below half an ulp (~2**-{bits}*|avg|), so at decay 0.999 weights must differ "
                f"from the average by more than ~{2**-bits / 1e-3:.0f}x its size to move it. "
                "Keep the default float32 unless memory forbids it.",
                UserWarning,
                stacklevel=2,
            )
        self._model = model
        self._root = unwrap(model)
        self._entries = select_tensors(self._root, buffers, include, exclude)
        self._storage: FlatStorage | None = None
        self._swap: SwapState | None = None
        self._modules: dict[str, nn.Module] = {}
        self._fsdp = fsdp_modules(self._root)
        self._shards: dict[str, ShardInfo] = {}
        if not any(is_uninitialized(e.get()) for e in self._entries):
            self._build()

    # ----------------------------------------------------------------- construction
    def _build(self) -> None:
        lives = [e.get() for e in self._entries]
        for e, t in zip(self._entries, lives):
            if is_uninitialized(t):
                raise ValueError(
                    f"{e.name} is not initialised yet (lazy module): run one forward pass "
                    "before the first update()"
                )
        avg = [(e, t) for e, t in zip(self._entries, lives) if e.mode == "average"]
        cpy = [(e, t) for e, t in zip(self._entries, lives) if e.mode == "copy"]
        self._storage = FlatStorage(
            [(e.name, t.shape, self._avg_dtype(t), self._device or t.device) for e, t in avg],
            rows=len(self._timeline.names),
        )
        self._copies = FlatStorage(
            [(e.name, t.shape, t.dtype, self._device or t.device) for e, t in cpy], rows=1
        )
        with torch.no_grad():
            for row in self._storage.views:
                for (_, t), v in zip(avg, row.values()):
                    v.copy_(t)
            for (_, t), v in zip(cpy, self._copies.views[0].values()):
                v.copy_(t)
        self._shards = {e.name: i for e in self._entries if (i := shard_info(e.raw())) is not None}
        self._bind(lives)

    def _avg_dtype(self, t: torch.Tensor) -> torch.dtype:
        # float32 (the default) is a floor: a float64 model keeps float64; an explicit bf16/fp16
        # request is honoured (the memory-saving opt-in) except for complex tensors.
        if self._dtype in _LOW_PRECISION and t.is_floating_point():
            return self._dtype
        return torch.promote_types(t.dtype, self._dtype)

    def _bind(self, lives: list[torch.Tensor]) -> None:
        """Check the live tensors against the storage and cache the kernels' argument lists."""
        assert self._storage is not None
        rows = [list(r.values()) for r in self._storage.views]
        copies = list(self._copies.views[0].values())
        averaged = [i for i, e in enumerate(self._entries) if e.mode == "average"]
        copied = [i for i, e in enumerate(self._entries) if e.mode == "copy"]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for j, i in enumerate(averaged):
            t, v = lives[i], rows[0][j]
            self._check_shape(self._entries[i].name, t, v)
            groups.setdefault((v.device, v.dtype, t.device, t.dtype), []).append(j)
        for i, v in zip(copied, copies):
            self._check_shape(self._entries[i].name, lives[i], v)
        self._groups: list[DirectGroup | StagedGroup] = []
        for (adev, adt, ldev, ldt), js in groups.items():
            group_rows = [[row[j] for j in js] for row in rows]
            index = [averaged[j] for j in js]
            if adev == ldev and adt == ldt:
                self._groups.append(DirectGroup(group_rows, index))
            else:
                shapes = [lives[i].shape for i in index]
                self._groups.append(StagedGroup(group_rows, index, shapes))
        self._copy_index = (copies, copied)
        self._lives = lives
        self._live_dtypes = [t.dtype for t in lives]

    @staticmethod
    def _check_shape(name: str, live: torch.Tensor, view: torch.Tensor) -> None:
        if live.shape != view.shape:
            raise ValueError(
                f"{name}: the model has shape {tuple(live.shape)} but the average has "
                f"{tuple(view.shape)}"
            )

    def _entry_order_lives(self) -> list[torch.Tensor]:
        return [e.get() for e in self._entries]

    def _refresh(self) -> None:
        """Re-fetch live tensors; rebind when a module replaced one or changed its dtype."""
        lives = self._entry_order_lives()
        if all(map(operator.is_, lives, self._lives)) and all(
            map(operator.is_, [t.dtype for t in lives], self._live_dtypes)
        ):
            return
        self._bind(lives)

    # ----------------------------------------------------------------- updating
    def update(self, model: nn.Module | None = None, *, steps: int = 1) -> None:
        """Account for ``steps`` optimizer steps and, when due, update every average.

        Call it after each ``optimizer.step()``. ``model`` may be passed (the common recipe); if
        it is not the model this EMA was built on, its tensors are matched by canonical name and
        the EMA follows that model from now on. ``steps=k`` declares that ``k`` optimizer steps
        happened since the last call (irregular gaps); the schedule covers all of them.

        Raises:
            RuntimeError: the averaged weights are swapped into the model.
            ValueError: the model's tensors no longer match the average (names or shapes).
        """
        if self._swap is not None:
            raise RuntimeError(
                "update() while the averaged weights are swapped into the model would average "
                "the average with itself; leave `ema.swapped(...)` or call restore() first"
            )
        if model is not None and unwrap(model) is not self._root:
            self._rebind(model)
        if self._fsdp:
            reshard(self._fsdp)  # after a no_grad forward FSDP2 leaves full weights registered
        if self._storage is None:
            self._build()
        plan = self._timeline.plan(steps)
        if plan.decays:
            self._refresh()
            self._apply(plan.decays)
        self._timeline.commit(plan)

    @torch.no_grad()
    def _apply(self, decays: tuple[float, ...]) -> None:
        lives = self._lives
        for group in self._groups:
            group.apply(lives, decays)
        views, index = self._copy_index
        if views:
            torch._foreach_copy_(views, [lives[i] for i in index])

    def _rebind(self, model: nn.Module) -> None:
        buffers, include, exclude = self._policy
        root = unwrap(model)
        entries = select_tensors(root, buffers, include, exclude)
        self._check_same_names([e.name for e in entries], "the model passed to update()")
        order = {e.name: e for e in entries}
        new = [order[e.name] for e in self._entries]
        for old, e in zip(self._entries, new):
            if old.mode != e.mode:
                raise ValueError(f"{e.name} is tracked as {old.mode} but would be {e.mode}")
        self._model, self._root, self._entries = model, root, new
        self._modules.clear()
        if self._storage is not None:
            self._bind(self._entry_order_lives())

    def _check_same_names(self, names: Iterable[str], what: str) -> None:
        ours = [e.name for e in self._entries]
        names = list(names)
        missing = [n for n in ours if n not in set(names)]
        extra = [n for n in names if n not in set(ours)]
        if missing or extra:
            raise ValueError(
                f"{what} does not match the average: missing {missing}, unexpected {extra}"
            )

    # ----------------------------------------------------------------- introspection
    @property
    def names(self) -> tuple[str, ...]:
        """Names of the averages, in the order given."""
        return self._timeline.names

    @property
    def step(self) -> int:
        """Optimizer steps counted so far (a Python int: reading it never syncs)."""
        return self._timeline.step

    @property
    def num_updates(self) -> int:
        """How many times the averages were changed (``step / update_every`` or fewer)."""
        return self._timeline.num_updates

    @property
    def last_decays(self) -> dict[str, float | None]:
        """The decay each average received at its last update (``None`` before any)."""
        return self._timeline.last_decay_by_name

    @property
    def tensor_names(self) -> list[str]:
        """Canonical names of the tracked tensors (averaged and copied)."""
        return [e.name for e in self._entries]

    @property
    def nbytes(self) -> int:
        """Memory held by the averages and copied buffers, in bytes."""
        self._ensure_built()
        assert self._storage is not None
        return self._storage.nbytes + self._copies.nbytes

    def _ensure_built(self) -> None:
        if self._storage is None:
            self._build()

    def __repr__(self) -> str:
        built = "not built" if self._storage is None else f"{self.nbytes / 2**20:.1f} MiB"
        return (
            f"EMA(averages={list(self.names)}, tensors={len(self._entries)}, step={self.step}, "
            f"dtype={self._dtype}, {built})"
        )
