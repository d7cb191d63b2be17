"""Hugging Face Accelerate: an EMA in ``accelerator.save_state`` / ``load_state``, sharded or not.

``accelerator.register_for_checkpointing(obj)`` makes ``save_state`` call ``obj.state_dict()``
on every rank and write what the main process got (``custom_checkpoint_<i>.pkl``), and makes
``load_state`` read that file into ``obj.load_state_dict`` on every rank. An :class:`polyak.EMA`
of an unsharded model (DDP, ZeRO-1/2) can be registered as it is: every rank holds the same
averages. Under DeepSpeed ZeRO-3 or FSDP2 each rank holds its own shards, and the main process's
alone would be saved; register :class:`FullState` instead, which saves the gathered average and
cuts it back into each rank's shards when loading (at any world size or sharding).

Accelerate reads that file with ``torch.load(weights_only=False)`` (``load_custom_state`` in its
``checkpointing.py``): it unpickles, so load only folders you wrote. ``EMA.load_state_dict`` then
checks every field and tensor before anything changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polyak import EMA

__all__ = ["FullState"]


class FullState:
    """What to register with ``accelerator.register_for_checkpointing`` for a sharded EMA.

    Its ``state_dict()`` is ``ema.state_dict(full=True)``: the full averages, gathered by a
    collective that every rank joins when ``save_state`` calls it (one per dtype under ZeRO-3),
    received by rank 0 only, which is the process Accelerate writes from. Its
    ``load_state_dict`` is ``ema.load_state_dict``, which cuts the full tensors into this rank's
    shards. Without sharding it saves and loads exactly what ``ema`` itself would.

    Args:
        ema: the :class:`polyak.EMA` to checkpoint.

    Examples:
        >>> from polyak.integrations.accelerate import FullState
        >>> ema = polyak.EMA(accelerator.unwrap_model(model), 0.999)        # doctest: +SKIP
        >>> accelerator.register_for_checkpointing(FullState(ema))          # doctest: +SKIP
    """

    def __init__(self, ema: EMA) -> None:
        from polyak import EMA

        if not isinstance(ema, EMA):
            raise TypeError(f"FullState takes a polyak.EMA, got {type(ema).__name__}")
        self.ema = ema

    def state_dict(self) -> dict[str, Any] | None:
        """The gathered state on rank 0, ``None`` on the other ranks (a collective)."""
        return self.ema.state_dict(full=True)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a full (or unsharded) state into this rank's shards; all or nothing."""
        self.ema.load_state_dict(state)
