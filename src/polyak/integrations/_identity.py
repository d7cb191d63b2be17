"""Resume identity of the Hugging Face callback: does a checkpoint's EMA state belong to it?

The EMA files of ``checkpoint-N`` (:mod:`polyak.integrations._ema_files`) record the run that
saved them and the trainer's global step. The Trainer itself keeps, in the same checkpoint's
``trainer_state.json``, the callback's :meth:`state` (``stateful_callbacks``, the
``ExportableState`` protocol of ``transformers/trainer_callback.py``): the run identity under
:data:`RECORD`. A resume accepts the EMA files only if both agree with the Trainer's own state:
the run ``trainer_state.json`` names, and the global step the Trainer resumes at. Files copied
in from another checkpoint of the run (another step) or from another run are refused with a
:class:`polyak.CheckpointError` that says which and what to do.
"""

from __future__ import annotations

import os
from typing import Any

from polyak.errors import CheckpointError
from polyak.integrations._ema_files import JSON_NAME, RUN, EMAFiles, read_ema_files

__all__ = ["RECORD", "check_identity", "read_own_files", "recorded_run"]

RECORD = "polyak_run"  # the attribute trainer_state.json keeps of the callback
_OWN_FILES = f"this checkpoint's own {JSON_NAME} and polyak_ema.<hash>.safetensors"


def recorded_run(stateful_callbacks: Any, name: str, where: str) -> str:
    """The run identity that ``trainer_state.json`` (``where``) keeps for the callback class
    ``name``: ``stateful_callbacks[name]["attributes"][RECORD]``, checked."""
    record = stateful_callbacks.get(name) if isinstance(stateful_callbacks, dict) else None
    if record is None:
        raise CheckpointError(
            f"{where} records no {name} under 'stateful_callbacks': the checkpoint was written "
            f"without {name}, or by an earlier polyak, so its EMA files cannot be told apart "
            f"from files copied in from elsewhere. Resume from a checkpoint that this version of "
            f"{name} saved"
        )
    attributes = record.get("attributes") if isinstance(record, dict) else None
    run = attributes.get(RECORD) if isinstance(attributes, dict) else None
    if not isinstance(run, str) or not RUN.fullmatch(run):
        raise CheckpointError(
            f"{where}: 'stateful_callbacks.{name}.attributes.{RECORD}' must be the run identity "
            f"(32 hex digits) {name} saved, got {record!r:.120}; put back this checkpoint's "
            "trainer_state.json"
        )
    return run


def check_identity(saved: EMAFiles, run: str, global_step: int, *, at: str) -> None:
    """Refuse ``saved`` unless it was saved by ``run`` at ``global_step``.

    Args:
        at: where the Trainer is, for the message (``"the Trainer resumes at"``).
    """
    if saved.run != run:
        raise CheckpointError(
            f"{saved.path}: the EMA state was saved by run {saved.run}, but this checkpoint "
            f"belongs to run {run} (trainer_state.json): the EMA files were copied in from "
            f"another run. Put back {_OWN_FILES}, or resume that other run's checkpoint"
        )
    if saved.global_step != global_step:
        raise CheckpointError(
            f"{saved.path}: the EMA state was saved at global step {saved.global_step}, but "
            f"{at} global step {global_step}: the EMA files were copied in from another "
            f"checkpoint. Put back {_OWN_FILES}, or resume from checkpoint-{saved.global_step}"
        )


def read_own_files(
    directory: str | os.PathLike[str], run: str, global_step: int, *, at: str
) -> EMAFiles:
    """The EMA files of ``directory`` (:func:`read_ema_files`), if they are ``run``'s at
    ``global_step`` (:func:`check_identity`)."""
    saved = read_ema_files(directory)
    check_identity(saved, run, global_step, at=at)
    return saved
