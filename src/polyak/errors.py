"""polyak's own exceptions (pure core: importing this module imports nothing else).

All derive from :class:`ValueError`, so code that catches bad input keeps working; catch these
names to react to each situation specifically.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ModelChangedError", "NonFiniteError", "SwappedStateDictWarning"]


class ModelChangedError(ValueError):
    """The model's tensors no longer match the ones an average was built on.

    Raised at the next ``update()``, ``swapped()``, ``copy_to()``, ``state_dict()``... after a
    tensor was added or removed, changed shape, or belongs to a module that replaced the one it
    was tracked in (a new head). ``added``, ``removed``, ``replaced`` and ``resized`` list the
    canonical names. Call :meth:`polyak.EMA.rebind` to accept the new model (unchanged tensors
    keep their averages, new ones start from their live values, removed ones are dropped).
    """

    def __init__(
        self,
        message: str,
        *,
        added: list[str] | None = None,
        removed: list[str] | None = None,
        replaced: list[str] | None = None,
        resized: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.added = added or []
        self.removed = removed or []
        self.replaced = replaced or []
        self.resized = resized or []


class NonFiniteError(ValueError):
    """An ``inf`` or ``nan`` met an average: in the live weights an update was about to use
    (``nonfinite="raise"``), in an average about to be copied into a model, or in a state dict.
    ``names`` lists the tensors (canonical names, or array paths for ``ArrayEMA``)."""

    def __init__(self, message: str, names: list[str] | None = None) -> None:
        super().__init__(message)
        self.names = names or []


class CheckpointError(ValueError):
    """A file or folder polyak reads back cannot be trusted as it is: malformed (a field missing,
    of the wrong type or out of range), unsafe (a file name that is not a plain name inside its
    folder, a symlink leaving it, a device), inconsistent with the files on disk, or written by
    another run or at another step than the one resuming. The message names the file and the
    field, and says what to do. Nothing outside the folder given is read, written or deleted."""


class SwappedStateDictWarning(UserWarning):
    """``model.state_dict()`` was taken while an average is swapped into the model: it holds the
    average, not the training weights. Filter this category where that is what you want."""
