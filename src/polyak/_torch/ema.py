"""``polyak.EMA``: averages of a PyTorch model's weights in flat fp32 storage.

The class composes small parts, each with one job: the :class:`~polyak._timeline.Timeline`
(steps and decays), the :class:`~polyak._torch.binding.Binding` (the model's tracked tensors,
the update groups over them, and whether the model changed), the
:class:`~polyak._torch.storage.Averages` it holds, the swap state
(:mod:`polyak._torch.swap`) and the state-dict codec (:mod:`polyak._torch.state`).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import nn

from polyak._deprecation import deprecated
from polyak._names import check_names
from polyak._timeline import Timeline, TimelineViews
from polyak._torch import adapters, zero
from polyak._torch import state as codec
from polyak._torch.bema import Corrected, anchor_row, corrected, follow
from polyak._torch.binding import Binding, Policy, bind, kept_names, pending, select
from polyak._torch.naming import unwrap
from polyak._torch.sharding import is_sharded, reshard
from polyak._torch.swap import SwapState, guard, shared_module, swap_in, swap_out
from polyak.errors import NonFiniteError
from polyak.types import BufferPolicy, DecayLike, FrozenPolicy, NonFinite, TensorLayout

__all__ = ["EMA", "UpdateLists"]

_LOW_PRECISION = {torch.bfloat16: 8, torch.float16: 11}  # significant bits
_NONFINITE = ("propagate", "raise", "skip")
_FROZEN = ("live", "average")


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


def _names_of(names: list[str]) -> str:
    return f"{names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class EMA(TimelineViews):
    """Exponential moving averages of a model's weights, kept outside the model.

    After each optimizer step, :meth:`update` applies to every tracked tensor of every average

        avg <- avg + (1 - decay_t) * (live - avg)        (= decay_t*avg + (1-decay_t)*live)

    in the average's dtype, with ``decay_t`` from the average's schedule over the optimizer steps
    since its last update (``decay**k`` after ``k`` steps for a constant decay, so the horizon
    does not depend on ``update_every``). The average starts as a copy of the weights.

    Storage: the averages live in one contiguous buffer per (device, dtype), with a view per
    tensor; building an ``EMA`` copies the weights once and never deep-copies the model, so
    wrapped (DDP, ``torch.compile``) and lazily initialised models work. An update is one
    ``torch._foreach_lerp_`` per group and average, allocates nothing, never syncs with the
    device (the step counter is a Python int), and does no per-tensor work in Python.

    Precision: averages are float32 by default, also for a bfloat16/float16 model (whose own
    precision freezes an EMA: at decay 0.9999 a bf16 average cannot move unless the weights are
    ~40x away). A float64 model keeps a float64 average. Lower precision is an explicit opt-in
    (``dtype=torch.bfloat16``) and warns.

    Tensors: floating parameters are averaged; floating buffers are averaged
    (``buffers="average"``, as EMAN / timm), copied from the model (``"copy"``) or left out
    (``"ignore"``); integer buffers (``num_batches_tracked``) are always copied, never averaged.
    Frozen parameters (``requires_grad=False`` when the EMA is built: a PEFT/LoRA model's base)
    are not stored: their average is the parameter itself, so every read (:meth:`swapped`,
    :meth:`copy_to`, :meth:`get_module`, :meth:`averaged_state_dict`, :mod:`polyak.export`)
    takes them from the model, and the averages of a LoRA model hold the adapters only
    (``frozen="average"`` stores them as before). One of them that starts requiring grad later
    raises :class:`polyak.ModelChangedError` naming it at the next update; :meth:`rebind`
    then averages it from its live value on. Which parameters are frozen is decided when the
    EMA is built (or rebound): a parameter averaged then stays averaged when it is frozen
    later (PEFT's ``set_adapter``).
    Names are canonical (``module.``, ``_orig_mod.`` stripped); ``include``/``exclude`` take glob
    patterns over them.

    Guarantees: every method that changes something is all or nothing (a failure, even out of
    memory, leaves the model and the averages as they were). A model that changes under the
    EMA is seen at the next update: new storages, dtypes and devices of the same tensors
    (``model.to(...)``, ``param.data = ...`` of the same shape) are followed; added, removed,
    resized or replaced tensors (a new head) raise :class:`polyak.ModelChangedError` until
    :meth:`rebind` accepts them. A non-finite average is never handed out silently:
    :meth:`swapped`, :meth:`get_module` and :meth:`state_dict` warn, :meth:`copy_to` raises.
    Calls from several threads are serialised (a lock per EMA).

    Args:
        model: the model being trained (possibly wrapped by DDP or ``torch.compile``).
        decay: a float, a schedule from :mod:`polyak.schedules`, or a sequence / dict of them
            to keep several averages at once; a BEMA average (:func:`polyak.averages.bema`)
            too, whose reads are bias-corrected (one more copy, its anchor).
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
            Parameter objects stay the same (optimizers built before keep working; weight
            tying, ``state_dict``, ``.to()`` too). Tensors it cannot move (FSDP2 shards,
            channels_last, views of other tensors) are named in a warning and averaged as
            usual. See :mod:`polyak._torch.flat_params`.
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
        nonfinite: what an update does when the live weights hold ``inf``/``nan``:
            ``"propagate"`` (default: nothing special, the average becomes non-finite and is
            reported when handed out; no cost), ``"raise"`` (:class:`polyak.NonFiniteError`
            naming the tensors, nothing changed; one host sync per update) or ``"skip"`` (the
            averages stay as they were for that update, decided on the device without a sync;
            :attr:`skipped_updates` counts them). Both checks read the live weights once more
            per update; the README gives the measured cost.
        frozen: ``"live"`` (default): parameters that do not require grad when the EMA is
            built are read from the model, not stored; ``"average"``: stored and averaged
            like the others (the behaviour of earlier versions).

    Examples:
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
        decay: DecayLike = 0.999,
        *,
        buffers: BufferPolicy = "average",
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
        nonfinite: NonFinite = "propagate",
        frozen: FrozenPolicy = "live",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
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
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if frozen not in _FROZEN:
            raise ValueError(f"frozen must be one of {_FROZEN}, got {frozen!r}")
        device = None if device is None else torch.device(device)
        if device is not None and device.type == "meta":
            raise ValueError(
                "device='meta': averages on the meta device hold no data and could never be "
                "read; pass device=None (each tensor's own device) or a real device"
            )
        self._timeline = Timeline(decay, update_every=update_every, start_step=start_step)
        self._policy = Policy(
            buffers,
            include,
            exclude,
            dtype,
            device,
            flat_params,
            compile_update,
            seed if stochastic_rounding else None,
            nonfinite,
            frozen,
        )
        if dtype in _LOW_PRECISION and not stochastic_rounding:
            bits = _LOW_PRECISION[dtype]
            warnings.warn(
                f"averages stored in {dtype}: an update is lost when (1-decay)*|live-avg| is "
                f"below half an ulp (~2**-{bits}*|avg|), so at decay 0.999 weights must differ "
                f"from the average by more than ~{2**-bits / 1e-3:.2g}x its size to move it. "
                "Keep the default float32 unless memory forbids it"
                + (", or pass stochastic_rounding=True." if dtype == torch.bfloat16 else "."),
                UserWarning,
                stacklevel=2,
            )
        self._model = model
        self._lock = threading.Lock()
        self._swap: SwapState | None = None
        # module, updates when checked, adapters' state when made
        self._modules: dict[str, tuple[nn.Module, int, Any]] = {}
        self._refreshers: dict[str, Any] = {}  # BEMA modules: recompute the correction if due
        self._owned: dict[int, torch.Tensor] = {}  # the flat buffers flat_params made
        self._freeze_warned = False
        selection = select(model, self._policy)  # bad policies fail here, built or not
        self._names = [e.name for e in selection.entries]
        self._binding: Binding | None = None
        if pending(selection.entries, selection.lives) is None:
            self._binding = bind(model, self._policy, selection, self._rows, None, self._owned)

    # ----------------------------------------------------------------- binding
    @property
    def _k(self) -> int:
        return len(self._timeline.names)

    @property
    def _rows(self) -> int:
        """Storage rows: the averages, then the anchors of the BEMA averages."""
        return self._k + len(self._timeline.anchored)

    def _bound(self) -> Binding:
        """The binding, made now if the model's weights did not exist when the EMA was built."""
        if self._binding is None:
            self._binding = bind(
                self._model,
                self._policy,
                select(self._model, self._policy),
                self._rows,
                None,
                self._owned,
            )
        return self._binding

    def _commit(self, model: nn.Module, binding: Binding) -> None:
        self._model, self._binding = model, binding
        self._names = [e.name for e in binding.entries]
        self._modules.clear()
        self._refreshers.clear()

    def _follow(self, model: nn.Module) -> Binding:
        """``update(other_model)``: the same tensors by name and shape, read from ``model``."""
        if self._binding is None:
            selection = select(model, self._policy)
        else:
            selection = self._binding.reselect(model)
        check_names(
            self._names, [e.name for e in selection.entries], "the model passed to update()"
        )
        if self._binding is None:
            binding = bind(model, self._policy, selection, self._rows, None, self._owned)
        else:
            old = {e.name: e.mode for e in self._binding.entries}
            for e in selection.entries:
                if old[e.name] != e.mode:
                    raise ValueError(f"{e.name} is tracked as {old[e.name]} but would be {e.mode}")
            binding = Binding(model, self._policy, self._binding.averages, selection, self._owned)
            binding.skip_count = self._binding.skip_count
        self._commit(model, binding)
        return binding

    def rebind(self, model: nn.Module | None = None) -> dict[str, list[str]]:
        """Accept a changed model (or another one): the averages follow its tensors from now on.

        A tensor with the same name, shape and owning module as before keeps its averages; a
        new one (new name, new shape, or a module that replaced the old one, as a fine-tuning
        head does) starts every average from its live value; tensors no longer in the model
        are dropped. All or nothing: the new storage is filled before the old one is released
        (so, for a moment, both are held).

        Returns:
            ``{"kept": [...], "new": [...], "dropped": [...]}``, canonical names.
        """
        with self._lock:
            self._not_swapped("rebind()")
            model = self._model if model is None else model
            selection = select(model, self._policy)
            old = self._binding
            if old is not None and selection.frozen:  # averaged before: averaged still
                tracked = {e.name for e in old.entries}
                frozen = [e.name for e in selection.frozen if e.name not in tracked]
                selection = select(model, self._policy, frozen)
            binding = bind(model, self._policy, selection, self._rows, old, self._owned)
            entries = selection.entries
            kept = kept_names(old, entries, selection.lives) if old is not None else []
            report = {
                "kept": kept,
                "new": [e.name for e in entries if e.name not in set(kept)],
                "dropped": [n for n in self._names if n not in {e.name for e in entries}],
            }
            self._commit(model, binding)
            return report

    # ----------------------------------------------------------------- updating
    def update(self, model: nn.Module | None = None, *, steps: int = 1) -> None:
        """Account for ``steps`` optimizer steps and, when due, update every average.

        Call it after each ``optimizer.step()``. ``model`` may be passed (the common recipe); if
        it is not the model this EMA was built on, its tensors are matched by canonical name and
        the EMA follows that model from now on. ``steps=k`` declares that ``k`` optimizer steps
        happened since the last call (irregular gaps); the schedule covers all of them.

        Raises:
            RuntimeError: the averaged weights are swapped into the model.
            polyak.ModelChangedError: tensors were added, removed, resized or replaced.
            polyak.NonFiniteError: with ``nonfinite="raise"``, the live weights hold inf/nan.
            ValueError: a model passed here whose tensors do not match by name.
        """
        with self._lock:
            self._not_swapped("update()", "would average the average with itself")
            if model is not None and unwrap(model) is not unwrap(self._model):
                binding = self._follow(model)
            else:
                binding = self._bound()
            binding.check()
            plan = self._timeline.plan(steps)
            if plan.decays:
                if self._policy.dtype in _LOW_PRECISION and not self._freeze_warned:
                    self._warn_freeze(plan.decays)
                binding.apply(plan.decays + plan.anchors, self._timeline.num_updates)
            self._timeline.commit(plan)

    def _warn_freeze(self, decays: tuple[float, ...]) -> None:
        # round-to-nearest loses (1-d)*|live-avg| below half an ulp, 2**-(bits+1..bits)*|avg|
        bits, d = _LOW_PRECISION[self._policy.dtype], max(decays)
        if self._policy.rounding_seed is None and 0.0 < d < 1.0:
            lo, hi = 2.0 ** -(bits + 1) / (1.0 - d), 2.0**-bits / (1.0 - d)
            if lo >= 0.01:
                self._freeze_warned = True
                warnings.warn(
                    f"averages in {self._policy.dtype} with round-to-nearest, decay {d}: a "
                    f"weight's average moves only while |live - avg| exceeds {lo:.2g}-{hi:.2g}x "
                    "|avg|; smaller changes are rounded away and the average freezes. Keep "
                    "float32" + (" or pass stochastic_rounding=True." if bits == 8 else "."),
                    UserWarning,
                    stacklevel=4,
                )

    def _not_swapped(self, what: str, why: str = "") -> None:
        if self._swap is not None:
            raise RuntimeError(
                f"{what} while the averaged weights are swapped into the model"
                + (f" {why}" if why else "")
                + "; leave `ema.swapped(...)` or call restore() first"
            )

    # ----------------------------------------------------------------- using an average
    def averaged_tensors(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """``{tensor name: view}`` of one average (averaged and copied tensors), no copies.

        Under FSDP2 these are this rank's shards; ``state_dict(full=True)`` gathers them. For a
        BEMA average (:func:`polyak.averages.bema`) these are the stored EMA part, not the
        corrected weights: the correction ``alpha (live - anchor)`` depends on the live weights
        at the time of the read, so it cannot be a view; ``averaged_state_dict(name)`` (and
        every other read) gives the corrected weights.
        """
        return self._bound().averages.row(self._row(name))

    def _read(self, row: int, binding: Binding) -> dict[str, torch.Tensor]:
        """What a read of average ``row`` gives: the stored views, or BEMA's corrected weights
        in a new buffer."""
        fixed = corrected(binding, self._timeline, row)
        return binding.averages.row(row) if fixed is None else fixed

    def live_tensors(self) -> dict[str, torch.Tensor]:
        """``{tensor name: live tensor}``: the model's tracked tensors as the averages read
        them (the tensors themselves, not copies; under FSDP2 this rank's shards)."""
        binding = self._bound()
        binding.check()
        return dict(zip((e.name for e in binding.entries), binding.lives))

    def nonfinite_tensors(self, name: str | None = None) -> list[str]:
        """Names of the tensors of average ``name`` that hold ``inf``/``nan`` (empty: all
        finite). One reduction over the average; syncs with the device."""
        return self._bound().averages.nonfinite(self._row(name))

    def _warn_nonfinite(self, row: int, what: str) -> None:
        bad = self._bound().averages.nonfinite(row)
        if bad:
            warnings.warn(
                f"{what}: average {self._timeline.names[row]!r} holds inf/nan in "
                f"{_names_of(bad)} (the live weights fed it non-finite values; "
                "EMA(nonfinite='skip' or 'raise') prevents this)",
                UserWarning,
                stacklevel=4,
            )

    def apply_shadow(self, model: nn.Module | None = None, name: str | None = None) -> None:
        """Put average ``name`` into ``model`` (default: the trained model) until
        :meth:`restore`. No copy when the average has the model's dtype and device; FSDP2
        shards and ZeRO-3 partitions are copied in (and back), since the framework gathers
        from its own storage (under ZeRO-3 the gathered copies of persistent parameters are
        dropped on the way in and out, so each forward gathers what the partitions hold). All
        or nothing: a failure (e.g. out of memory for a cast copy) leaves the model as it was.

        Prefer ``with ema.swapped(model):``, which restores even when its body raises.
        """
        with self._lock:
            if self._swap is not None:
                raise RuntimeError("averaged weights are already swapped in; call restore() first")
            binding = self._bound()
            binding.verify()
            row = self._row(name)
            root, entries = binding.targets(model)
            sources = list(self._read(row, binding).values())
            for e, live in binding.frozen_targets(model):  # another model: ours are the average
                entries, sources = [*entries, e], [*sources, live]
            self._warn_nonfinite(row, "swapping in")
            zero.check_swappable(e.raw() for e in entries)
            merged = adapters.enter(root)  # PEFT adapters merged into the frozen base
            try:
                state = swap_in(
                    root,
                    [e.name for e in entries],
                    [e.get() for e in entries],
                    sources,
                    [is_sharded(e.raw()) for e in entries],
                    [e.is_param for e in entries],
                )
            except BaseException:
                adapters.leave(merged)
                raise
            state.adapters = merged
            state.partitioned = [e.raw() for e in entries if zero.is_partitioned(e.raw())]
            try:
                zero.release(state.partitioned)  # the next forward gathers the average
            except BaseException:
                swap_out(state)  # also unmerges the adapters
                raise
            self._swap = state
            guard(self, state)

    def restore(self, model: nn.Module | None = None) -> None:
        """Give the model back its training weights, bit for bit, after :meth:`apply_shadow`.

        Raises:
            RuntimeError: nothing is swapped in; or parameters were written while the average
                was swapped in (an optimizer step): the weights are restored, but those writes
                went into the average.
        """
        self._restore(strict=True)

    def _restore(self, strict: bool) -> None:
        with self._lock:
            if self._swap is None:
                raise RuntimeError("restore() without apply_shadow(): nothing is swapped in")
            state, self._swap = self._swap, None
            if self._binding is not None and self._binding.fsdp:
                reshard(self._binding.fsdp)  # drop full weights gathered from the average
            written = swap_out(state)
            zero.release(state.partitioned)  # ZeRO-3's persistent parameters: the same
        if written:
            message = (
                f"parameters {_names_of(written)} were written while the average was swapped "
                "in (an optimizer step on swapped weights?); the training weights are back, but "
                "those writes went into the average. Train outside `ema.swapped(...)`"
            )
            if strict:
                raise RuntimeError(message)
            warnings.warn(message, UserWarning, stacklevel=4)

    @contextlib.contextmanager
    def swapped(
        self, model: nn.Module | None = None, name: str | None = None
    ) -> Iterator[nn.Module]:
        """Context manager: the model evaluates with average ``name`` inside the block.

        The training weights come back bit for bit on exit, also when the block raises. Inside
        the block ``update()`` raises, and ``model.state_dict()`` warns (it would save the
        average). Training inside the block writes into the average: leaving the block raises
        ``RuntimeError`` when a parameter was written (a warning if the block raised).

        Examples:
            >>> with ema.swapped(model):                      # doctest: +SKIP
            ...     val_loss = evaluate(model, val_loader)
        """
        self.apply_shadow(model, name)
        try:
            yield model if model is not None else self._model
        except BaseException:
            self._restore(strict=False)
            raise
        self._restore(strict=True)

    @torch.no_grad()
    def copy_to(
        self, model: nn.Module | None = None, name: str | None = None, *, restart: bool = False
    ) -> None:
        """Write average ``name`` into ``model``'s tensors permanently (a copy, cast as needed).

        Called on the trained model during training, this is a write-back (Switch EMA, Li et al.
        2024; :class:`polyak.workflows.WriteBack` schedules it). The optimizer's state is not
        touched: Adam's moments keep describing the old trajectory (see the write-back guide).

        ``restart=True`` (PMA-style, Li et al. 2025): after writing, the averages start again
        from the written weights, as if the EMA were built now: every average (and each BEMA
        anchor) is set to them, and the schedules count steps from here
        (:meth:`polyak._timeline.Timeline.restart`): a uniform or power average weighs only the
        weights after the restart, a warm-up (``inverse_power``, BEMA's) warms up again, a
        constant decay is not affected by the count. ``step`` keeps counting optimizer steps.

        Under ZeRO-3 the average is written into each rank's partition and the gathered
        copies of persistent parameters are dropped (the next forward gathers the average).
        With mixed precision the optimizer's float32 master weights are not changed: copy at
        the end of training.

        Raises:
            polyak.NonFiniteError: the average holds inf/nan (nothing is written).
        """
        if not isinstance(restart, bool):
            raise TypeError(f"restart must be True or False, got {restart!r}")
        with self._lock:
            self._not_swapped("copy_to()", "would be undone by restore()")
            binding = self._bound()
            binding.verify()
            row = self._row(name)
            bad = binding.averages.nonfinite(row)
            if bad:
                raise NonFiniteError(
                    f"average {self._timeline.names[row]!r} holds inf/nan in {_names_of(bad)}; "
                    "nothing was copied into the model",
                    bad,
                )
            _, entries = binding.targets(model)
            source = self._read(row, binding)
            sources = list(source.values())
            for e, live in binding.frozen_targets(model):  # another model: ours are the average
                entries, sources = [*entries, e], [*sources, live]
            params = [e.raw() for e in entries]
            zero.check_swappable(params)
            targets = [e.get() for e in entries]
            staged = [
                s.to(t.device, t.dtype) for t, s in zip(targets, sources)
            ]  # every allocation before the first write
            for t, s in zip(targets, staged):
                t.copy_(s)
            if restart:
                averaged = binding.averages.averaged
                for views in averaged.views:
                    for n, v in views.items():
                        if v.data_ptr() != source[n].data_ptr():
                            v.copy_(source[n])
                self._timeline.restart()
            zero.release(params)

    def get_module(self, name: str | None = None) -> nn.Module:
        """An ``nn.Module`` that evaluates with average ``name``, in eval mode.

        A BEMA average's module holds its own corrected copy (one more copy of the tensors),
        recomputed at its first forward after an update or a change of the live weights.

        Memory: only the module structure. Its parameters and buffers *are* the average's
        storage (views, no copy), so it follows every :meth:`update`; tensors the EMA does not
        track (excluded, ``buffers="ignore"``) are shared with the trained model. It holds the
        averages in their own dtype (float32 for a bf16 model). Do not ``.to()`` or cast it:
        that would give it its own copy, detached from the average; pick ``dtype``/``device``
        when building the EMA instead. Not available for sharded models (FSDP2, ZeRO-3): use
        :meth:`swapped`. The model check and the inf/nan warning run when the module is made
        and at the first call after each update, so calling it per batch costs nothing. Plain
        attributes are copied when the module is made; for PEFT adapter layers (active adapter,
        LoRA ``scaling``) a change is seen at that first call after an update too, and the
        module is made again (``swapped`` always uses the model's own state).
        """
        row = self._row(name)
        key = self._timeline.names[row]
        cached = self._modules.get(key)
        if cached is not None and cached[1] == self._timeline.num_updates:
            return cached[0]  # checked since the last update: no work per call (eval loops)
        binding = self._bound()
        state = adapters.fingerprint(binding.root)  # PEFT's non-tensor state, e.g. scaling
        if cached is not None and cached[2] != state:
            cached = None  # the module copied the adapters' old state: make it again
        if state is not None and any(layer[3] for layer in state):
            raise TypeError(
                "get_module() of a PEFT model whose adapters are merged into the base weights "
                "(merge_adapter()): the module would evaluate the live adapters. Call "
                "unmerge_adapter() first, or evaluate with `with ema.swapped(model):`"
            )
        if binding.shards:
            raise TypeError(
                "get_module() cannot copy a sharded model (FSDP2 or DeepSpeed ZeRO-3); evaluate "
                "with `with ema.swapped(model):` or export with ema.state_dict(full=True)"
            )
        binding.verify()
        self._warn_nonfinite(row, "get_module()")
        refresh = self._refreshers.get(key)
        if cached is not None and refresh is not None:
            refresh()
        if cached is None:
            views = binding.averages.row(row)
            buffer = None
            if anchor_row(self._timeline, row) is not None:  # BEMA: its own corrected copy
                buffer = Corrected(binding)
                views = buffer.views()  # filled by the refresher below
            replacements = {id(t): v for t, v in zip(binding.lives, views.values())}
            keep = [
                t
                for m in binding.root.modules()
                for t in (*m._parameters.values(), *m._buffers.values())
                if t is not None and id(t) not in replacements
            ]
            cached = (shared_module(binding.root, replacements, keep), 0, state)
            if buffer is not None:
                self._refreshers[key] = follow(cached[0], buffer, self._timeline, row)
                self._refreshers[key]()
        self._modules[key] = (cached[0], self._timeline.num_updates, state)
        return cached[0]

    @property
    def module(self) -> nn.Module:
        """Deprecated: :meth:`get_module` (``get_module(name)`` for one of several averages)."""
        deprecated("EMA.module", "EMA.get_module()")
        return self.get_module(None)

    def averaged_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """The model's ``state_dict()`` with average ``name`` in place of the tracked tensors.

        What ``model.state_dict()`` would give inside ``swapped()``, without swapping: the keys
        are the (unwrapped) model's own, tied tensors appear under each of their names, untracked
        tensors are the model's. The averaged tensors are views of the average in its own dtype
        (float32 for a bf16 model; ``load_state_dict`` casts): save or clone them before the
        next update. Under FSDP2 or ZeRO-3 use ``state_dict(full=True)``.
        """
        binding = self._bound()
        if binding.shards:
            raise TypeError(
                "averaged_state_dict() of a sharded model (FSDP2 or DeepSpeed ZeRO-3): gather "
                "the average with ema.state_dict(full=True) instead"
            )
        binding.verify()
        row = self._row(name)
        self._warn_nonfinite(row, "averaged_state_dict()")
        views = self._read(row, binding)
        by_id = {id(t): views[e.name] for e, t in zip(binding.entries, binding.lives)}
        return {
            k: by_id.get(id(v), v.detach())
            for k, v in binding.root.state_dict(keep_vars=True).items()
        }

    def layout(self) -> dict[str, TensorLayout]:
        """``{tensor name: TensorLayout}``: what is stored for each tracked tensor (averaged or
        copied), its shape and dtype here, and, under sharding, the full shape and where this
        rank's shard starts (for a ZeRO-3 partition, a flat range of the flattened tensor:
        ``flat_offset``). Plain metadata: no copy, no device sync."""
        binding = self._bound()
        kinds = {e.name: ("average" if e.mode == "average" else "copied") for e in binding.entries}
        out = {}
        for name, view in binding.averages.row(0).items():
            info = binding.shards.get(name)
            shape = tuple(view.shape)
            out[name] = TensorLayout(
                kinds[name],  # type: ignore[arg-type]
                shape,
                view.dtype,
                info.global_shape if info else shape,
                info.offset if info else (0,) * len(shape),
                info is not None,
                getattr(info, "flat_offset", None),
            )
        return out

    @property
    def sharded(self) -> bool:
        """Deprecated: ``any(t.sharded for t in ema.layout().values())``."""
        deprecated("EMA.sharded", "any(t.sharded for t in EMA.layout().values())")
        return bool(self._bound().shards)

    # ----------------------------------------------------------------- saving and loading
    @overload
    def state_dict(self, *, full: Literal[False] = False) -> dict[str, Any]: ...

    @overload
    def state_dict(self, *, full: bool, rank0_only: bool = True) -> dict[str, Any] | None: ...

    def state_dict(self, *, full: bool = False, rank0_only: bool = True) -> dict[str, Any] | None:
        """Everything needed to resume: plain tensors, plain Python data, a format version.

        The tensors are views of the live storage (like ``nn.Module.state_dict``): save them
        (``torch.save``) or clone them before the next update. Loadable with
        ``torch.load(..., weights_only=True)``. Warns when an average holds inf/nan.

        Sharded models (FSDP2, DeepSpeed ZeRO-3): by default each rank gets its own shards (a
        ``"shards"`` table; no communication). ``full=True`` gathers full, unsharded tensors
        instead: a collective that every rank must call (ZeRO-3: one per dtype); with
        ``rank0_only`` only rank 0 receives the result (the others get ``None``). A full state
        dict loads at any world size, under another sharding (FSDP2, any ZeRO stage) or into
        an unsharded model. Without sharding ``full=True`` gives the same as the default.
        """
        binding = self._bound()
        for row in range(self._k):
            self._warn_nonfinite(row, "state_dict()")
        state = codec.encode(self._timeline, binding.averages, self._policy.dtype, binding.shards)
        if not full:
            return state
        rank0_only = rank0_only and torch.distributed.is_initialized()
        gathered = codec.gather(state, binding.shards, rank0_only)
        if rank0_only and torch.distributed.get_rank():
            return None
        return gathered

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, Any] | None:
        """Deprecated: ``state_dict(full=True, rank0_only=...)``."""
        deprecated("EMA.full_state_dict()", "EMA.state_dict(full=True)")
        return self.state_dict(full=True, rank0_only=rank0_only)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output (sharded or full); all checks come first.

        Saved values are copied into this EMA's storage, which keeps its dtype (a float32 average
        stays float32 whatever the checkpoint held). Tensor names may carry wrapper prefixes.
        Under FSDP2 and ZeRO-3 a full checkpoint (any world size) is cut into this rank's shards
        (or partition), and a
        rank whose checkpoint does not fit raises on every rank instead of leaving the others
        waiting in the next collective. All or nothing: a checkpoint that fails any check
        (a missing field, a wrong or non-finite tensor, inconsistent counters) changes nothing.
        """
        with self._lock:
            self._not_swapped("load_state_dict()")
            binding = self._bound()
            error: Exception | None = None
            commit = None
            try:
                commit = codec.stage(state, self._timeline, binding.averages, binding.shards)
            except (ValueError, KeyError, TypeError) as e:
                error = e
            codec.agree_across_ranks(bool(binding.shards), error)
            assert commit is not None  # agree_across_ranks raised otherwise
            commit()

    # ----------------------------------------------------------------- introspection
    @property
    def model(self) -> nn.Module:
        """The model whose weights are averaged, as it was passed (possibly wrapped)."""
        return self._model

    @property
    def tensor_names(self) -> list[str]:
        """Deprecated: ``list(ema.averaged_tensors())``, the canonical names of the tracked
        tensors (averaged and copied)."""
        deprecated("EMA.tensor_names", "list(EMA.averaged_tensors())")
        return list(self._names)

    @property
    def nbytes(self) -> int:
        """Memory held by the averages and copied buffers, in bytes."""
        return self._bound().averages.nbytes

    @property
    def skipped_updates(self) -> int:
        """Updates left out because the live weights were not finite (``nonfinite="skip"``).

        Counted on the device; reading it syncs.
        """
        count = None if self._binding is None else self._binding.skip_count
        return 0 if count is None else int(count)

    def _update_lists(self, name: str | None = None) -> UpdateLists:
        """The tensors an update of average ``name`` reads and writes (see :class:`UpdateLists`).

        For inspection and benchmarks; the lists hold the tensors as bound now.
        """
        with self._lock:
            binding = self._bound()
            binding.check()
            averaged, copied = binding.update_lists(self._row(name))
            return UpdateLists(averaged, copied, binding.launches)

    def __repr__(self) -> str:
        built = "not built" if self._binding is None else f"{self.nbytes / 2**20:.1f} MiB"
        return (
            f"EMA(averages={list(self.names)}, tensors={len(self._names)}, step={self.step}, "
            f"dtype={self._policy.dtype}, {built})"
        )
