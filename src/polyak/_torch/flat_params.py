"""``EMA(flat_params=True)``: the model's own tensors become views into contiguous buffers.

Where the live weights are scattered over hundreds of allocations, an update is one kernel per
tensor (``torch._foreach_lerp_``). Here each tracked parameter and buffer gets its ``.data``
rebound to a view of one buffer per (device, dtype), laid out exactly like the average's storage
(same element offsets, same padding), so that the update becomes one ``lerp_`` over two
contiguous buffers (:func:`polyak._torch.segments.build_segments` finds the layout again).

What stays the same: every ``nn.Parameter`` and buffer keeps its identity, shape, dtype,
``requires_grad`` and ``.grad``, so an optimizer built earlier still holds the right objects,
tied weights stay tied (one tensor, one slot), and ``state_dict`` / ``load_state_dict`` /
``torch.save`` work (a saved state dict stores the shared buffer once). ``model.to(...)``,
``.half()`` or a ``load_state_dict(assign=True)`` give the model new, scattered tensors; the EMA
notices at its next update and flattens them again.

Where it cannot apply (the tensor keeps its own storage, is updated on its own, and a warning
names it): FSDP2/DTensor shards (FSDP owns that memory), tensor subclasses, non-contiguous tensors
(``channels_last`` weights would lose their memory format), and tensors that share their storage
with something else (a view of another tensor: moving it would untie them).

Caveats: ``safetensors.torch.save_model`` refuses tensors that share a storage (save
``{k: v.clone() for k, v in model.state_dict().items()}`` or use ``save_file``), and saving one
parameter on its own with ``torch.save`` writes the whole buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polyak._torch.segments import joins
from polyak._torch.storage import FlatStorage, align

__all__ = ["describe_skipped", "flatten_"]

Item = tuple[int, str, torch.Tensor]  # (offset in the average's buffer, name, live tensor)


def _unmovable(t: torch.Tensor, name: str, sharded: set[str]) -> str | None:
    if name in sharded:
        return "an FSDP2/DTensor shard"
    if type(t.data) is not torch.Tensor or t.layout != torch.strided:
        return f"a {type(t.data).__name__} with layout {t.layout}"
    if t.device.type == "meta":
        return "on the meta device"
    if not t.is_contiguous():
        return "not contiguous (e.g. channels_last)"
    return None


def _shared(t: torch.Tensor, owned: dict[int, torch.Tensor]) -> bool:
    """``t`` is a view of a storage that is neither its own nor one made here."""
    storage = t.untyped_storage()
    exclusive = t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
    return not exclusive and storage.data_ptr() not in owned


def _runs(items: list[Item], position: dict[str, int]) -> list[list[Item]]:
    """Split items (sorted by offset) into runs of neighbours; those of length > 1."""
    runs: list[list[Item]] = []
    for item in items:
        if runs and position[item[1]] == position[runs[-1][-1][1]] + 1:
            runs[-1].append(item)
        else:
            runs.append([item])
    return [r for r in runs if len(r) > 1]


def flatten_(
    plans: Sequence[tuple[FlatStorage, Sequence[tuple[str, torch.Tensor]]]],
    sharded: set[str],
    owned: dict[int, torch.Tensor],
) -> list[tuple[str, str]]:
    """Rebind live tensors to views of new buffers laid out like the averages' storage.

    ``plans`` pairs each storage with its members ``(name, live tensor)``. Runs of neighbours in
    a storage (same live device and dtype) are laid out like it; runs already laid out so, and
    single tensors, are left alone. ``owned`` maps storage pointers to the buffers made here
    before (their views may be laid out again); it is updated and keeps only buffers still in
    use, so a buffer the model dropped (after ``model.to(...)``) is freed at the next binding.

    Returns:
        ``(name, reason)`` for each tensor that cannot be moved.
    """
    skipped: list[tuple[str, str]] = []
    todo: dict[tuple[torch.device, torch.dtype], list[list[Item]]] = {}
    in_use: set[int] = set()
    for storage, members in plans:
        position = storage.positions()
        groups: dict[tuple, list[Item]] = {}
        for name, t in members:
            why = _unmovable(t, name, sharded)
            if why is not None:
                skipped.append((name, why))
                continue
            in_use.add(t.untyped_storage().data_ptr())
            slot = storage.slots[name]
            groups.setdefault((slot.key, t.device, t.dtype), []).append((slot.offset, name, t))
        for (_, device, dtype), items in groups.items():
            for run in _runs(sorted(items, key=lambda i: i[0]), position):
                first_off, _, first = run[0]
                if all(joins(first, first_off, t, off) for off, _, t in run[1:]):
                    continue  # already laid out like the average
                shared = {n for _, n, t in run if _shared(t, owned)}
                skipped += [(n, "a view sharing its storage with other tensors") for n in shared]
                keep = [item for item in run if item[1] not in shared]
                todo.setdefault((device, dtype), []).extend(
                    r for r in _runs(keep, position) if len(r) > 1
                )
    with torch.no_grad():
        for (device, dtype), runs in todo.items():
            starts, total = [], 0
            for run in runs:
                starts.append(total)
                total += align(run[-1][0] + run[-1][2].numel() - run[0][0], dtype)
            buffer = torch.zeros(total, dtype=dtype, device=device)
            for run, start in zip(runs, starts):
                base = run[0][0]
                for off, _, t in run:
                    view = buffer[start + off - base : start + off - base + t.numel()]
                    view = view.view(t.shape)
                    view.copy_(t)
                    t.data = view
            ptr = buffer.untyped_storage().data_ptr()
            owned[ptr] = buffer
            in_use.add(ptr)
    for ptr in [p for p in owned if p not in in_use]:
        del owned[ptr]
    return skipped


def describe_skipped(skipped: Sequence[tuple[str, str]], total: int) -> str:
    """The warning for tensors ``flat_params=True`` could not move."""
    shown = ", ".join(f"{n} ({why})" for n, why in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    head = (
        "flat_params=True cannot apply: no tracked tensor can be moved"
        if len(skipped) == total
        else f"flat_params=True: {len(skipped)} of {total} tracked tensors keep their own storage"
    )
    return (
        f"{head}: {shown}{more}. These are averaged one kernel each, as without flat_params; "
        "the averages themselves are unaffected."
    )
