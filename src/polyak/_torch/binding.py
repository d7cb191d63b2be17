"""The model side of an :class:`polyak.EMA`: what it tracks, how an update reads it, and whether
the model is still the one the plan was made for.

A :class:`Binding` is made once per model and kept until the model changes: it holds the live
tensors (the parameter and buffer objects themselves), the update groups over them
(:mod:`polyak._torch.groups`) and a :class:`~polyak._torch.watch.Watch`. An update therefore
does no per-tensor work in Python: it asks the watch whether anything changed (a flag and, with
``flat_params``, one counter per flat buffer) and runs the groups.

What the watch sees, at no per-update cost:

* a parameter, buffer or submodule registered on a tracked module (``model.head = ...``,
  ``module.weight = nn.Parameter(...)``, new layers): global registration hooks;
* a tracked tensor's storage replaced (``param.data = ...``, ``model.to(...)``, ``.half()``,
  ``to_empty()``, ``torch.utils.swap_tensors``): a weak reference to each storage, whose
  callback runs when the old storage is freed; with ``flat_params`` the flat buffer's use count.

Either marks the binding stale; the next update then re-reads the model once (:meth:`refresh`):
a tensor with the same name, shape and module is followed (new storage, dtype or device: the
plan is rebuilt), anything else raises :class:`polyak.ModelChangedError`. What the watch
cannot see: a tensor deleted (``del module.weight``) or put straight into a module's
``_parameters``/``_buffers`` dict without a new storage for the old one (``model.to(...)`` writes
buffers that way, but also gives the parameters new storages, which the watch sees), and a
replaced storage that something else still holds (it is not freed). The full check that
:meth:`verify` runs before every swap, copy and module view finds those too.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from polyak._torch import zero
from polyak._torch.flat_params import describe_skipped, flatten_
from polyak._torch.groups import Gate, Group, plan_groups
from polyak._torch.naming import Entry, select_tensors, unmaterialized, unwrap
from polyak._torch.segments import Segment
from polyak._torch.sharding import Shard, fsdp_modules, reshard, same_local, shard_info
from polyak._torch.storage import Averages, all_finite, wide
from polyak._torch.watch import Watch, diff, thawed
from polyak.errors import ModelChangedError, NonFiniteError

__all__ = ["Binding", "Policy", "Selection", "bind", "kept_names", "pending", "select"]


@dataclass(frozen=True)
class Policy:
    """What an EMA tracks and how it stores and updates it (its constructor's options)."""

    buffers: str
    include: Any
    exclude: Any
    dtype: torch.dtype
    device: torch.device | None
    flat_params: bool
    compile_update: bool
    rounding_seed: int | None
    nonfinite: str
    frozen: str = "live"

    def average_dtype(self, t: torch.Tensor) -> torch.dtype:
        """float32 (the default) is a floor: a float64 model keeps float64; an explicit bf16/fp16
        request is honoured (the memory-saving opt-in) except for complex tensors."""
        if self.dtype in (torch.bfloat16, torch.float16) and t.is_floating_point():
            return self.dtype
        return torch.promote_types(t.dtype, self.dtype)


class Selection(NamedTuple):
    """What :func:`select` finds in a model."""

    root: nn.Module  #: the unwrapped model
    entries: list[Entry]  #: the tracked tensors (stored: averaged or copied)
    lives: list[torch.Tensor]  #: their live values (FSDP2: the local shards)
    frozen: list[Entry]  #: frozen parameters: tracked, not stored (their average is themselves)


def select(model: nn.Module, policy: Policy, frozen: Collection[str] | None = None) -> Selection:
    """The unwrapped model, its tracked tensors and their live values (FSDP2: the shards, after
    dropping the full weights a ``no_grad`` forward leaves registered).

    With ``policy.frozen == "live"`` the parameters in ``frozen`` (default: those that do not
    require grad now) are set apart: an average of a tensor that never changes is the tensor,
    so it is read from the model instead of stored (PEFT/LoRA: the frozen base model). Which
    parameters are frozen is decided when a binding is made and kept afterwards (``frozen``),
    so a parameter frozen later (PEFT's ``set_adapter``) is still averaged.
    """
    root = unwrap(model)
    fsdp = fsdp_modules(root)
    if fsdp:
        reshard(fsdp)
    entries = select_tensors(root, policy.buffers, policy.include, policy.exclude)
    kept: list[Entry] = []
    if policy.frozen == "live":
        if frozen is None:
            frozen = {e.name for e in entries if _frozen(e)}
        kept = [e for e in entries if e.name in frozen]
        if len(kept) == len(entries):
            raise ValueError(
                f"every tracked tensor of the model is a frozen parameter (requires_grad=False; "
                f"{len(kept)} of them), so there is nothing to average: unfreeze the parameters "
                "to train before building the EMA, or pass frozen='average' to store them anyway"
            )
        entries = [e for e in entries if e.name not in frozen]
    return Selection(root, entries, [e.get() for e in entries], kept)


def _frozen(e: Entry) -> bool:
    return e.is_param and e.mode == "average" and not e.raw().requires_grad


def pending(entries: Sequence[Entry], lives: Sequence[torch.Tensor]) -> str | None:
    """Why the weights do not exist yet (lazy or meta tensors), or None."""
    for e, t in zip(entries, lives):
        why = unmaterialized(e.name, t)
        if why is not None:
            return why
    return None


class Binding:
    """The tracked tensors of one model and the update plan over them.

    Args:
        model: the model as passed (possibly wrapped).
        policy: the EMA's options.
        averages: the storage the plan writes into.
        selection: ``select(model, policy)``, when already made.
        owned: the flat buffers ``flat_params`` made (shared across bindings of one EMA).
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Policy,
        averages: Averages,
        selection: Selection | None = None,
        owned: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.policy = policy
        self.averages = averages
        self.root, self.entries, self.lives, self.frozen = selection or select(model, policy)
        self.fsdp = fsdp_modules(self.root)
        self.owned = {} if owned is None else owned
        self.skipped: tuple[tuple[str, str], ...] = ()
        self._gates: dict[torch.device, Gate] = {}
        self.skip_count: torch.Tensor | None = None
        self._warned = False
        self._plan()

    # ----------------------------------------------------------------- planning
    def _members(self, mode: str) -> list[tuple[str, torch.Tensor]]:
        return [(e.name, t) for e, t in zip(self.entries, self.lives) if e.mode == mode]

    def _plan(self) -> None:
        p = self.policy
        shapes = self.shapes()
        for e, t in zip(self.entries, self.lives):
            if t.shape != shapes[e.name]:
                raise ModelChangedError(
                    f"{e.name}: the model has shape {tuple(t.shape)} but the average has "
                    f"{tuple(shapes[e.name])}; call ema.rebind() to start it afresh",
                    resized=[e.name],
                )
        averaged, copied = self._members("average"), self._members("copy")
        sharded = {e.name for e, t in zip(self.entries, self.lives) if e.raw() is not t}
        self.shards: dict[str, Shard] = {
            e.name: info for e in self.entries if (info := shard_info(e.raw(), e.name)) is not None
        }
        if p.flat_params:
            plans = ((self.averages.averaged, averaged), (self.averages.copied, copied))
            skipped = tuple(flatten_(plans, sharded, self.owned))
            if skipped and skipped != self.skipped:
                warnings.warn(describe_skipped(skipped, len(self.lives)), UserWarning, stacklevel=5)
            self.skipped = skipped
        gate = self._gate if p.nonfinite == "skip" else None
        rounded = None
        if p.rounding_seed is not None:
            from polyak._torch.rounding import RoundedGroup

            seed, count = p.rounding_seed, iter(range(1 << 30))

            def rounded(segments: list[Segment]) -> Group:
                g = gate(segments[0].rows[0].device) if gate is not None else None
                return RoundedGroup(segments, seed, next(count), gate=g)

        self.groups = plan_groups(
            self.averages.averaged, averaged, rounded=rounded, compiled=p.compile_update, gate=gate
        )
        self.copy_groups = plan_groups(self.averages.copied, copied, copy=True, gate=gate)
        if p.compile_update and not self.skipped and not self.spans and not self._warned:
            self._warned = True
            warnings.warn(
                "compile_update=True applies to weights laid out like the averages; pass "
                "flat_params=True (the update stays on the eager kernels)",
                UserWarning,
                stacklevel=5,
            )
        # (index, entry, the ZeRO-3 parameter): DeepSpeed's parameter table is slow to read at
        # every update, and DeepSpeed never replaces a parameter object (FSDP2 does: re-read)
        self.sharded = [
            (i, e, raw if zero.is_partitioned(raw := e.raw()) else None)
            for i, e in enumerate(self.entries)
            if e.name in sharded
        ]
        self.watch = Watch(self.root, self.lives, self.owned, [e.raw() for e in self.frozen])

    def _gate(self, device: torch.device) -> Gate:
        if device not in self._gates:
            self._gates[device] = Gate(device)
        return self._gates[device]

    def shapes(self) -> dict[str, torch.Size]:
        """Each tracked tensor's shape, as its average has it."""
        return {n: v.shape for n, v in self.averages.row(0).items()}

    @property
    def spans(self) -> bool:
        """Some tensors are read as flat spans (``flat_params`` took effect)."""
        return any(s.span for g in self.groups for s in g.segments)

    @property
    def launches(self) -> int:
        return sum(g.launches for g in [*self.groups, *self.copy_groups])

    # ----------------------------------------------------------------- watching
    def check(self) -> None:
        """Before an update: re-plan if the model changed, or raise if it changed shape."""
        if self.fsdp:
            reshard(self.fsdp)  # after a no_grad forward FSDP2 leaves full weights registered
        if self.watch.changed() or (
            self.sharded
            and any(
                not same_local(e.raw() if p is None else p, self.lives[i])
                for i, e, p in self.sharded
            )
        ):
            self.refresh()

    def reselect(self, model: nn.Module | None = None) -> Selection:
        """``select`` on ``model`` (default: the bound one), with the frozen parameters that
        were set apart when this binding's averages were made."""
        frozen = [e.name for e in self.frozen]
        return select(self.model if model is None else model, self.policy, frozen)

    def refresh(self, selection: Selection | None = None) -> None:
        """Re-read the model; follow new storages, dtypes and devices, refuse other changes."""
        root, entries, lives, frozen = selection or self.reselect()
        error = diff(self.entries, entries, self.shapes(), lives) or thawed(frozen)
        if error is not None:
            raise error
        why = pending(entries, lives)
        if why is not None:
            raise ModelChangedError(why)
        self.root, self.entries, self.lives, self.frozen = root, entries, lives, frozen
        self._plan()

    def verify(self) -> None:
        """The full check (also what the watch cannot see), before a swap, copy or save."""
        selection = self.reselect()
        _, entries, lives, frozen = selection
        if (
            self.watch.changed()
            or len(frozen) != len(self.frozen)
            or any(a.raw() is not b.raw() for a, b in zip(frozen, self.frozen))
            or any(not same_local(e.raw(), b) for e, b in zip(entries, self.lives))
            or diff(self.entries, entries, self.shapes(), lives) is not None
        ):
            self.refresh(selection)

    # ----------------------------------------------------------------- updating
    def finite(self) -> torch.Tensor:
        """A 0-d bool tensor: every live value an update reads is finite (no host sync).

        A sum (flat spans: one kernel each) or an L2 norm (scattered tensors: one foreach), in
        float32 at least, is inf/nan iff a value is, or when it overflows (values beyond ~1e30,
        resp. ~1e15, count as non-finite). On a 2-core CPU a sum of 20M floats took 0.4x the
        time of an L2 norm and 0.02x that of ``isfinite(x).all()``.
        """
        flags = []
        for group in [*self.groups, *self.copy_groups]:
            spans: list[torch.Tensor] = []
            tensors: list[torch.Tensor] = []
            for s in group.segments:
                x = s.source
                if x.numel() and (x.is_floating_point() or x.is_complex()):
                    (spans if s.span else tensors).append(x)
            flags += [x.sum(dtype=wide(x.dtype)) for x in spans]
            if tensors:  # one live dtype per group
                norms = torch._foreach_norm(tensors, 2, dtype=wide(tensors[0].dtype))
                flags.append(torch.stack(norms))
        if not flags:
            return torch.ones((), dtype=torch.bool)
        ok = torch.isfinite(flags[0]).all()
        for f in flags[1:]:
            ok = ok & torch.isfinite(f).all().to(ok.device, non_blocking=True)
        return ok

    def nonfinite_names(self) -> list[str]:
        """Names of the live tensors holding ``inf``/``nan`` (a host sync per tensor)."""
        return [e.name for e, t in zip(self.entries, self.lives) if not all_finite(t)]

    def apply(self, decays: tuple[float, ...], updates: int) -> None:
        """Run every group: average ``k`` moves with ``decays[k]``; copies are refreshed."""
        nonfinite = self.policy.nonfinite
        if nonfinite == "raise" and not bool(self.finite()):
            names = self.nonfinite_names()
            raise NonFiniteError(
                f"the live weights hold inf/nan in {names[:10]}"
                + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                + "; the averages were not updated (nonfinite='raise'). Pass "
                "nonfinite='skip' to leave them unchanged on such steps instead",
                names,
            )
        if self._gates:
            ok = self.finite()
            for gate in self._gates.values():
                gate.set(ok)
            first = next(iter(self._gates.values()))
            if self.skip_count is None:
                self.skip_count = torch.zeros((), dtype=torch.int64, device=first.bad.device)
            self.skip_count.add_(first.bad)
        if self.policy.rounding_seed is not None:
            for group in self.groups:
                reseed = getattr(group, "reseed", None)
                if reseed is not None:
                    reseed(updates)
        with torch.no_grad():
            for group in self.groups:
                group.apply(decays)
            for group in self.copy_groups:
                group.apply((0.0,))

    def update_lists(self, k: int) -> tuple[list, list]:
        """``(averaged, copied)``: per group, the views of average ``k`` and their sources."""

        def pairs(groups: list[Group], row: int) -> list:
            return [
                ([s.rows[row] for s in g.segments], [s.read() for s in g.segments]) for g in groups
            ]

        return pairs(self.groups, k), pairs(self.copy_groups, 0)

    def targets(self, model: nn.Module | None) -> tuple[nn.Module, list[Entry]]:
        """The tracked tensors of ``model`` (default: the bound one), matched by name."""
        if model is None or unwrap(model) is self.root:
            return self.root, self.entries
        from polyak._torch.naming import check_tensors

        root, entries, lives, _ = self.reselect(model)
        ours = dict(zip((e.name for e in self.entries), self.lives))
        check_tensors(ours, dict(zip((e.name for e in entries), lives)), type(model).__name__)
        by_name = {e.name: e for e in entries}
        return root, [by_name[e.name] for e in self.entries]

    def frozen_targets(self, model: nn.Module | None) -> list[tuple[Entry, torch.Tensor]]:
        """``(entry of model, our live tensor)`` per frozen parameter when ``model`` is another
        model (whose own frozen tensors may differ from ours, the average); empty otherwise."""
        if model is None or unwrap(model) is self.root or not self.frozen:
            return []
        theirs = {e.name: e for e in select_tensors(unwrap(model), self.policy.buffers)}
        missing = [e.name for e in self.frozen if e.name not in theirs]
        if missing:
            raise ValueError(
                f"{type(model).__name__} has no tensors {missing[:5]} (frozen parameters of the "
                "averaged model, whose average is their value): pass a model of the same "
                "architecture"
            )
        pairs = []
        for e in self.frozen:
            mine, other = e.get(), theirs[e.name]
            if other.get().shape != mine.shape:
                raise ValueError(
                    f"{type(model).__name__}: {e.name} has shape {tuple(other.get().shape)}, "
                    f"here {tuple(mine.shape)}"
                )
            pairs.append((other, mine))
        return pairs


def kept_names(old: Binding, entries: Sequence[Entry], lives: Sequence[torch.Tensor]) -> list[str]:
    """Names whose tensor ``old`` tracked with the same shape, kind and owning module."""
    before = {e.name: e for e in old.entries}
    shapes = old.shapes()
    return [
        e.name
        for e, t in zip(entries, lives)
        if e.name in before
        and before[e.name].owner is e.owner
        and before[e.name].mode == e.mode
        and shapes[e.name] == t.shape
    ]


def bind(
    model: nn.Module,
    policy: Policy,
    selection: Selection,
    k: int,
    old: Binding | None,
    owned: dict[int, torch.Tensor],
) -> Binding:
    """A new binding on ``model`` with ``k`` fresh averages: copies of the live weights, except
    for tensors ``old`` tracked with the same name, shape and module, which keep their averages.

    Changes nothing that exists (all or nothing for the caller, who commits the result).
    """
    _, entries, lives, frozen = selection
    error = thawed(frozen)
    if error is not None:
        raise error
    why = pending(entries, lives)
    if why is not None:
        raise ValueError(why)
    specs = {
        mode: [
            (e.name, t.shape, policy.average_dtype(t) if mode == "average" else t.dtype,
             policy.device or t.device)
            for e, t in zip(entries, lives)
            if e.mode == mode
        ]
        for mode in ("average", "copy")
    }  # fmt: skip
    averages = Averages([e.name for e in entries], specs["average"], specs["copy"], k)
    kept = set() if old is None else set(kept_names(old, entries, lives))
    before = [] if old is None else old.averages.averaged.views
    with torch.no_grad():
        for row, views in enumerate(averages.averaged.views):
            for e, t in zip(entries, lives):
                if e.mode == "average":
                    views[e.name].copy_(before[row][e.name] if e.name in kept else t)
        for e, t in zip(entries, lives):
            if e.mode == "copy":
                averages.copied.views[0][e.name].copy_(t)
    binding = Binding(model, policy, averages, selection, owned)
    if old is not None:
        binding.skip_count = old.skip_count
    return binding
