"""Whether a model changed under its EMA: the watch (no per-update cost) and the diff (the full
check it triggers). See :mod:`polyak._torch.binding` for what each sees."""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polyak._torch.naming import Entry
from polyak.errors import ModelChangedError

__all__ = ["Watch", "diff", "thawed"]

_USE_COUNT: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)
_WATCHES: weakref.WeakSet[Watch] = weakref.WeakSet()
_HOOKS: list[Any] = []
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _mark(key: int) -> None:
    for watch in list(_WATCHES):
        if key in watch.modules:
            watch.stale = True


def _on_registration(module: nn.Module, name: str, value: Any) -> None:
    _mark(id(module))


class _WatchedDict(dict):
    """A watched module's ``_parameters`` / ``_buffers``. Registration hooks do not see a tensor
    set to ``None`` (``module.bias = None``) or deleted (``del module.weight``); this dict marks
    the module's watches stale when that happens, at no cost otherwise. A tensor stored directly
    (FSDP2 swapping its sharded and unsharded parameters at every step) marks nothing: the
    registration hooks and storage weakrefs see what matters there. Copies and pickles of the
    module get a plain dict (``__reduce__``), so nothing of polyak travels with a saved or
    deep-copied model."""

    __slots__ = ("_key",)
    _key: int

    def __setitem__(self, key: Any, value: Any) -> None:
        if value is None:
            _mark(self._key)
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        _mark(self._key)
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        _mark(self._key)
        return super().pop(*args)

    def popitem(self) -> Any:
        _mark(self._key)
        return super().popitem()

    def clear(self) -> None:
        _mark(self._key)
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        _mark(self._key)
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        _mark(self._key)
        return super().setdefault(key, default)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


def _watch_dicts(module: nn.Module) -> None:
    for attr in ("_parameters", "_buffers"):
        d = module.__dict__.get(attr)
        if type(d) is dict:
            watched = _WatchedDict(d)
            watched._key = id(module)
            module.__dict__[attr] = watched


def _install_hooks() -> None:
    if not _HOOKS:
        from torch.nn.modules import module as m

        _HOOKS.append(m.register_module_parameter_registration_hook(_on_registration))
        _HOOKS.append(m.register_module_buffer_registration_hook(_on_registration))
        _HOOKS.append(m.register_module_module_registration_hook(_on_registration))


class Watch:
    """Says whether the model may have changed since the plan was made (module docstring)."""

    def __init__(
        self,
        root: nn.Module,
        lives: Sequence[torch.Tensor],
        owned: dict[int, Any],
        frozen: Sequence[torch.Tensor] = (),
    ):
        _install_hooks()
        # Frozen parameters are not stored (their average is themselves) until one is unfrozen,
        # which no hook reports: ``requires_grad`` is read at every check, one C-level
        # attribute read per frozen parameter (~0.03 us each).
        self._frozen = tuple(frozen)
        self.modules = frozenset(id(m) for m in root.modules())
        for m in root.modules():
            _watch_dicts(m)
        self.stale = False
        owned_set = set(owned)
        self._refs: list[weakref.ref] = []
        seen: set[int] = set()
        for t in lives:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # no storage (a tensor subclass)
                continue
            ptr = storage.data_ptr()
            if ptr in owned_set or (ptr in seen and ptr != 0):
                continue
            seen.add(ptr)
            self._refs.append(weakref.ref(storage, self._fire))
        # StorageImpl pointers (not data pointers) of the flat buffers, and their use counts
        impls = [b.untyped_storage()._cdata for b in owned.values()]
        self._counts = [(p, _USE_COUNT(p)) for p in impls] if _USE_COUNT is not None else []
        self._owned_unwatched = bool(owned) and _USE_COUNT is None
        _WATCHES.add(self)

    def _fire(self, _: object) -> None:
        self.stale = True

    def changed(self) -> bool:
        if self.stale or self._owned_unwatched or any(map(_REQUIRES_GRAD, self._frozen)):
            return True
        return any(_USE_COUNT(ptr) != count for ptr, count in self._counts)  # type: ignore[misc]


def diff(
    old: Sequence[Entry], new: Sequence[Entry], shapes: Mapping[str, torch.Size], lives: Any
) -> ModelChangedError | None:
    """The structural change from the tensors ``old`` (whose averages have ``shapes``) to
    ``new`` (with live values ``lives``), if any."""
    before = {e.name: e for e in old}
    after = {e.name: (e, t) for e, t in zip(new, lives)}
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    replaced, resized, moded = [], [], []
    for n in before.keys() & after.keys():
        e0, (e1, t1) = before[n], after[n]
        if e0.owner is not e1.owner:
            replaced.append(n)
        elif shapes[n] != t1.shape:
            resized.append(n)
        elif e0.mode != e1.mode:
            moded.append(f"{n} ({e0.mode} -> {e1.mode})")
    if not (added or removed or replaced or resized or moded):
        return None
    parts = [
        f"{what} {items}"
        for what, items in (
            ("added", added),
            ("removed", removed),
            ("replaced by a new module", sorted(replaced)),
            (
                "resized",
                [f"{n} {tuple(shapes[n])} -> {tuple(after[n][1].shape)}" for n in sorted(resized)],
            ),
            ("now of another kind", sorted(moded)),
        )
        if items
    ]
    return ModelChangedError(
        "the model changed under the EMA: "
        + "; ".join(parts)
        + ". Call ema.rebind() to accept it (unchanged tensors keep their averages, new ones "
        "start from their live values, removed ones are dropped), or build a new EMA",
        added=added,
        removed=removed,
        replaced=sorted(replaced),
        resized=sorted(resized),
    )


def thawed(frozen: Sequence[Entry]) -> ModelChangedError | None:
    """The error for parameters that were frozen when the averages were made (so their average
    is not stored: it is the parameter) and now require grad, if any."""
    names = [e.name for e in frozen if e.raw().requires_grad]
    if not names:
        return None
    shown = f"{names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return ModelChangedError(
        f"the parameters {shown} were frozen (requires_grad=False) when the EMA was built, so "
        "their average is not stored (it is the parameter itself), and they now require grad: "
        "training them would leave them out of the averages. Call ema.rebind() to average them "
        "from now on (they start from their live values; the other averages are kept), or build "
        "the EMA with frozen='average' to store every parameter from the start",
        added=names,
    )
