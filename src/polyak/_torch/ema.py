"""``polyak.EMA``: averages of a PyTorch model's weights in flat fp32 storage."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from polyak._timeline import Timeline, TimelineViews
from polyak._torch.ema_state import StateMixin
from polyak._torch.ema_use import UseMixin
from polyak._torch.flat_params import describe_skipped, flatten_
from polyak._torch.naming import is_uninitialized, select_tensors, unwrap
from polyak._torch.rounding import RoundedGroup
from polyak._torch.sharding import ShardInfo, fsdp_modules, reshard, shard_info
from polyak._torch.storage import FlatStorage
from polyak._torch.update import plan_groups
from polyak._torch.views import SwapState

__all__ = ["EMA", "UpdateLists"]

_FORMAT = "polyak.EMA"
_VERSION = 1
_LOW_PRECISION = {torch.bfloat16: 8, torch.float16: 11}  # significant bits


@dataclass(frozen=True)
class UpdateLists:
    """The tensors one :meth:`EMA.update` reads and writes, grouped as its kernels group them.

    ``averaged``: per update group (one average buffer, one live device and dtype), the views of
    one average and the tensors the update reads into them, in the same order: live tensors, or
    spans of several tensors where ``flat_params=True`` laid them out like the average. Where the
    dtypes agree, ``torch._foreach_lerp_(avgs, sources, 1 - decay)`` over each pair is what the
    update computes for that average (the bare kernels, e.g. to measure the update's overhead);
    where they differ the update stages a cast. ``copied``: the same for copied tensors.
    ``launches``: kernels launched by one update of every average.
    """

    averaged: list[tuple[list[torch.Tensor], list[torch.Tensor]]]
    copied: list[tuple[list[torch.Tensor], list[torch.Tensor]]]
    launches: int


class EMA(UseMixin, StateMixin, TimelineViews):
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
        flat_params: make the model's own tracked parameters and buffers views into one
            contiguous buffer per (device, dtype), laid out like the averages, so that an
            update is a single ``lerp_`` instead of one kernel per tensor (~20% less time for
            a 400-tensor transformer or a ResNet-50 on a 2-core CPU, benchmarks/results). The
            Parameter objects stay the same
            (optimizers built before keep working; weight tying, ``state_dict``, ``.to()``
            too). Tensors it cannot move (FSDP2 shards, channels_last, views of other
            tensors) are named in a warning and averaged as usual. See
            :mod:`polyak._torch.flat_params`.
        stochastic_rounding: with ``dtype=torch.bfloat16``, round each update to bf16
            stochastically (unbiased) instead of to nearest, which freezes the average.
            Computes in float32 chunk by chunk; allocates nothing per update.
        seed: seed of the stochastic rounding noise; the stream is a function of
            ``(seed, update count)`` only, identical on every rank and across a resume.
        compile_update: update runs of flat weights (``flat_params=True``) with one kernel
            generated by ``torch.compile``, which reads the weights once for all averages and
            casts bf16 weights in registers: 5 averages in ~0.6x the time of 5 EMAs, a bf16
            model as fast as a float32 one. The first update compiles (~20 s, ~5 s from
            Inductor's on-disk cache). See :mod:`polyak._torch.compiled`.

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
        flat_params: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        compile_update: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._timeline = Timeline(decay, update_every=update_every, start_step=start_step)
        self._policy = (buffers, include, exclude)
        self._dtype = dtype
        self._device = None if device is None else torch.device(device)
        for flag, value in (
            ("flat_params", flat_params),
            ("stochastic_rounding", stochastic_rounding),
            ("compile_update", compile_update),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if stochastic_rounding and dtype != torch.bfloat16:
            raise ValueError(
                f"stochastic_rounding=True rounds averages stored in bfloat16; pass "
                f"dtype=torch.bfloat16 (got dtype={dtype})"
            )
        self._flat_params = flat_params
        self._compile_update = compile_update
        self._flat_owned: dict[int, torch.Tensor] = {}
        self._flat_skipped: tuple[tuple[str, str], ...] = ()
        self._rounding_seed = seed if stochastic_rounding else None
        self._freeze_warned = False
        if dtype in _LOW_PRECISION and not stochastic_rounding:
            bits = _LOW_PRECISION[dtype]
            warnings.warn(
                f"averages stored in {dtype}: an update is lost when (1-decay)*|live-avg| is "
                f"below half an ulp (~2**-{bits}*|avg|), so at decay 0.999 weights must differ "
                f"from the average by more than ~{2**-bits / 1e-3:.0f}x its size to move it. "
                "Keep the default float32 unless memory forbids it"
                + (", or pass stochastic_rounding=True." if dtype == torch.bfloat16 else "."),
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
        """Check the live tensors against the storage and plan the kernels (update.py)."""
        assert self._storage is not None
        averaged = [(e.name, i) for i, e in enumerate(self._entries) if e.mode == "average"]
        copied = [(e.name, i) for i, e in enumerate(self._entries) if e.mode == "copy"]
        for views, members in ((self._storage.views[0], averaged), (self._copies.views[0], copied)):
            for name, i in members:
                self._check_shape(name, lives[i], views[name])
        if self._flat_params:
            plans = ((self._storage, averaged), (self._copies, copied))
            skipped = flatten_(plans, lives, set(self._shards), self._flat_owned)
            if skipped and tuple(skipped) != self._flat_skipped:
                warnings.warn(describe_skipped(skipped, len(lives)), UserWarning, stacklevel=4)
            self._flat_skipped = tuple(skipped)
        rounded = None
        if self._rounding_seed is not None:
            seed, count = self._rounding_seed, iter(range(1 << 30))
            rounded = lambda segments: RoundedGroup(segments, seed, next(count))  # noqa: E731
        self._groups, watched = plan_groups(
            self._storage, averaged, lives, rounded=rounded, compiled=self._compile_update
        )
        if self._compile_update and not watched and not self._flat_skipped:
            warnings.warn(
                "compile_update=True applies to weights laid out like the averages; pass "
                "flat_params=True (the update stays on the eager kernels)",
                UserWarning,
                stacklevel=4,
            )
            self._compile_update = False
        self._copy_groups, watched_copies = plan_groups(self._copies, copied, lives, copy=True)
        # cached spans read storages directly: a moved storage (new .data) needs a rebind;
        # elsewhere the kernels read the live tensors afresh and only a new dtype matters
        self._watched = sorted(set(watched + watched_copies))
        self._watched_ptrs = [lives[i].data_ptr() for i in self._watched]
        spans = set(self._watched)
        self._dtype_checked = [i for i, t in enumerate(lives) if i not in spans or t.numel() == 0]
        self._getters = [
            (e.owner._parameters if e.is_param else e.owner._buffers, e.attr) for e in self._entries
        ]
        self._sharded = [
            i for i, (e, t) in enumerate(zip(self._entries, lives)) if e.raw() is not t
        ]
        self._lives = lives
        self._live_dtypes = [lives[i].dtype for i in self._dtype_checked]

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
        """Re-fetch live tensors; rebind when a module replaced one, changed its dtype, or moved
        a storage that a cached span (flat_params) reads."""
        lives: list[torch.Tensor] = [table[attr] for table, attr in self._getters]  # type: ignore[misc]
        for i in self._sharded:
            lives[i] = self._entries[i].get()
        whole = len(self._watched) == len(lives)  # a flat model: skip the indexing
        if (
            all(map(operator.is_, lives, self._lives))
            and all(
                map(
                    operator.is_,
                    [t.dtype for t in lives]
                    if len(self._dtype_checked) == len(lives)
                    else [lives[i].dtype for i in self._dtype_checked],
                    self._live_dtypes,
                )
            )
            and (
                list(map(torch.Tensor.data_ptr, lives))
                if whole
                else [lives[i].data_ptr() for i in self._watched]
            )
            == self._watched_ptrs
        ):
            return
        self._bind(self._entry_order_lives())

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
        if self._rounding_seed is not None:
            for group in self._groups:
                if isinstance(group, RoundedGroup):
                    group.reseed(self._timeline.num_updates)
        elif self._dtype in _LOW_PRECISION and not self._freeze_warned:
            # round-to-nearest loses (1-d)*|live-avg| below half an ulp, 2**-(bits+1..bits)*|avg|
            bits, d = _LOW_PRECISION[self._dtype], max(decays)
            if 0.0 < d < 1.0 and 2.0 ** -(bits + 1) / (1.0 - d) >= 0.01:
                self._freeze_warned = True
                lo, hi = 2.0 ** -(bits + 1) / (1.0 - d), 2.0**-bits / (1.0 - d)
                warnings.warn(
                    f"averages in {self._dtype} with round-to-nearest, decay {d}: a weight's "
                    f"average moves only while |live - avg| exceeds {lo:.2g}-{hi:.2g}x |avg|; "
                    "smaller changes are rounded away and the average freezes. Keep float32"
                    + (" or pass stochastic_rounding=True." if bits == 8 else "."),
                    UserWarning,
                    stacklevel=4,
                )
        for group in self._groups:
            group.apply(lives, decays)
        for group in self._copy_groups:
            group.apply(lives, (0.0,))

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
    def tensor_names(self) -> list[str]:
        """Canonical names of the tracked tensors (averaged and copied)."""
        return [e.name for e in self._entries]

    @property
    def nbytes(self) -> int:
        """Memory held by the averages and copied buffers, in bytes."""
        self._ensure_built()
        assert self._storage is not None
        return self._storage.nbytes + self._copies.nbytes

    def update_lists(self, name: str | None = None) -> UpdateLists:
        """The tensors an update of average ``name`` reads and writes (see :class:`UpdateLists`).

        For inspection and benchmarks; the lists hold the tensors as bound now.
        """
        self._ensure_built()
        self._refresh()
        row = self._row(name)

        def pairs(groups: list[Any], k: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
            return [
                ([s.rows[k] for s in g.segments], [s.source(self._lives) for s in g.segments])
                for g in groups
            ]

        launches = sum(g.kernels for g in self._groups + self._copy_groups)
        return UpdateLists(pairs(self._groups, row), pairs(self._copy_groups, 0), launches)

    def _ensure_built(self) -> None:
        if self._storage is None:
            self._build()

    def __repr__(self) -> str:
        built = "not built" if self._storage is None else f"{self.nbytes / 2**20:.1f} MiB"
        return (
            f"EMA(averages={list(self.names)}, tensors={len(self._entries)}, step={self.step}, "
            f"dtype={self._dtype}, {built})"
        )
