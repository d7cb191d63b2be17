"""Hugging Face ``transformers``: :class:`EMACallback` keeps averages of the weights in the
``Trainer``, evaluates them, saves them in every checkpoint and resumes them.

With Accelerate alone no callback is needed: a :class:`polyak.EMA` has ``state_dict`` /
``load_state_dict``, so ``accelerator.register_for_checkpointing(ema)`` makes
``accelerator.save_state`` / ``load_state`` carry it (``examples/accelerate_ema.py``).
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from polyak import export
from polyak.integrations._common import Averaging, rng_untouched
from polyak.integrations._ema_files import save_ema_files
from polyak.integrations._identity import RECORD, read_own_files, recorded_run
from polyak.types import DecayLike, EMAOptions
from polyak.workflows.write_back import WriteBack

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from polyak import EMA

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "polyak.integrations.transformers needs transformers: pip install 'polyak[transformers]'"
    ) from e

__all__ = ["EMACallback"]

_ATTACHED = "_polyak_ema_callback"  # the trainer's attribute naming its EMACallback


class EMACallback(TrainerCallback, ExportableState):
    """Averages of the weights in the Hugging Face ``Trainer``, evaluated, saved and resumed.

    After every optimizer step the callback applies, to every tracked tensor of every average,

        avg <- decay_t * avg + (1 - decay_t) * live

    through a :class:`polyak.EMA` (fp32 flat storage, schedules over optimizer steps). What
    happens where:

    * ``on_init_end``: finds the ``Trainer`` it was given to and wraps its ``evaluate``,
      ``predict`` and ``train`` methods (the Trainer has no hook before an evaluation: it
      evaluates between ``on_step_end`` and ``on_evaluate``).
    * ``on_train_begin``: builds the EMA on the model the Trainer trains (``trainer.model``:
      the module inside DDP, on its device, after checkpoint weights were loaded); when
      resuming, loads the EMA state of that checkpoint after checking that it belongs to it
      (see *Resume identity*); starts counting the optimizer's steps.
    * ``on_step_end``: one update per optimizer step (``gradient_accumulation_steps`` respected;
      a step a gradient scaler skipped does not count).
    * ``evaluate()`` (direct, or periodic through ``eval_strategy``): on the average
      (``evaluate="average"``), the live weights (``"live"``), or all (``"both"``): each
      average is evaluated with ``metric_key_prefix`` + ``"_ema"`` (``eval_ema_loss``; with
      several averages each one's, ``eval_ema_<name>_loss``), then the live weights; the
      metrics are logged in one ``log_history`` row and ``on_evaluate`` fires once with all
      of them, so ``metric_for_best_model="ema_loss"`` and ``EarlyStoppingCallback`` see them. The
      weights are swapped (pointers, no copy) and always given back bit for bit; never swapped
      before the first update. ``predict()`` uses the average unless ``evaluate="live"``.
    * ``on_save``: writes ``checkpoint-N/polyak_ema.<hash>.safetensors`` (tensors) and
      ``polyak_ema.json`` (step counters, schedule state, run identity, global step, size and
      checksum) atomically after the Trainer wrote the checkpoint.
    * ``on_train_end``: with ``load_best_model_at_end``, loads the best checkpoint's EMA as
      well; then copies an average into the model if ``final_weights`` asks (so
      ``trainer.save_model()`` saves it).

    Resume identity: the callback is an ``ExportableState``, so the Trainer keeps its
    :meth:`state` (the run identity, ``polyak_run``) in every checkpoint's
    ``trainer_state.json`` under ``stateful_callbacks``, written by the Trainer itself. Resuming
    from ``checkpoint-N`` loads its EMA files only if they were saved at global step ``N`` (the
    step the Trainer resumes at) by the run that ``trainer_state.json`` names: EMA files copied
    in from another checkpoint of the run, or from another run, are a
    :class:`polyak.CheckpointError` saying which, as are files that fail any check of
    :mod:`polyak.files` (a name that is not the writer's plain pattern, a symlink leaving the
    folder, a size or checksum that differs, a malformed field). With
    ``restore_callback_states_from_checkpoint=True`` the Trainer rebuilds each stateful
    callback from its saved arguments; this one keeps no arguments there (a schedule is not
    JSON), so the rebuilt stand-in hands its place back to the instance given to the
    ``Trainer`` and training goes on with it.

    Args:
        decay: a float, a schedule from :mod:`polyak.schedules`, or a sequence / dict of them
            (several averages), as for :class:`polyak.EMA`.
        evaluate: ``"average"`` (default), ``"live"`` or ``"both"``.
        average: name of the average evaluated, exported or copied (default: the first).
        final_weights: what the model holds after training: ``"live"`` (default),
            ``"average"`` (the evaluated one) or an average's name.
        write_back: a :class:`polyak.workflows.WriteBack`: copy an average into the trained
            model at its optimizer steps (after that step's update) or epoch ends
            (``on_epoch_end``, before the Trainer's epoch evaluation), restarting
            the averages if it says so (Switch EMA, PMA). A decay may be a BEMA average
            (:func:`polyak.averages.bema`): evaluation and exports then use its corrected weights.
        **ema_kwargs: any other :class:`polyak.EMA` argument.

    Examples:
        >>> from polyak.integrations.transformers import EMACallback
        >>> cb = EMACallback(decay=0.999, evaluate="both")                  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, callbacks=[cb], ...)  # doctest: +SKIP
        >>> trainer.train()        # or train(resume_from_checkpoint=True)  # doctest: +SKIP
        >>> trainer.evaluate()["eval_ema_loss"]                             # doctest: +SKIP
        >>> cb.save_pretrained("average")  # for from_pretrained("average") # doctest: +SKIP

    References:
        Morales-Brotons, Vogels & Hendrikx, "Exponential Moving Average of Weights in Deep
        Learning: Dynamics and Benefits", TMLR 2024. TRL's ``trl/trainer/callbacks.py``
        (``BEMACallback``) keeps no state in checkpoints, so a resumed run restarts its
        average.
    """

    def __init__(
        self,
        decay: DecayLike = 0.999,
        *,
        evaluate: Literal["average", "live", "both"] = "average",
        average: str | None = None,
        final_weights: str = "live",
        write_back: WriteBack | None = None,
        **ema_kwargs: Unpack[EMAOptions],
    ) -> None:
        self._avg = Averaging(
            decay,
            evaluate=evaluate,
            average=average,
            final_weights=final_weights,
            ema_kwargs=ema_kwargs,
            owner="EMACallback",
            write_back=write_back,
        )
        self._trainer: Any = None  # the Trainer found by on_init_end / on_train_begin
        self._run = uuid.uuid4().hex
        self._resume: str | None = None  # the checkpoint train() was asked to resume from

    @property
    def ema(self) -> EMA | None:
        """The :class:`polyak.EMA` (``None`` until training starts)."""
        return self._avg.ema

    # ----------------------------------------------------------------- hooks
    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._attach(_find_trainer(self))

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self._trainer is None:  # added with trainer.add_callback(), or rebuilt by the Trainer
            trainer = _find_trainer(self)
            if RECORD in vars(self):
                self._hand_back(trainer, args, state, control, **kwargs)
                return
            self._attach(trainer)
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError(
                "EMACallback runs only inside a transformers.Trainer: pass it as "
                "Trainer(callbacks=[...]) or trainer.add_callback(...)"
            )
        self._avg.build(trainer.model)
        self._run = uuid.uuid4().hex
        if state.global_step > 0:  # resuming: the Trainer loaded this checkpoint's weights
            step_dir = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            directory = self._resume or os.path.join(str(args.output_dir), step_dir)
            where = os.path.join(directory, "trainer_state.json")
            run = recorded_run(state.stateful_callbacks, type(self).__name__, where)
            self._load(directory, run, state.global_step, at="the Trainer resumes at")
        self._avg.count_steps(kwargs["optimizer"], trainer.model_wrapped)  # DeepSpeed: its engine

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._avg.update()
        if self._avg.write_back is not None and self.ema is not None:
            self._avg.write_back_after(kwargs["model"], "steps", self.ema.step)

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._avg.write_back_after(kwargs["model"], "epochs", round(state.epoch or 0))

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self.ema is None:
            return
        saved = self._avg.checkpoint_state()  # on every rank: a collective under FSDP2
        if saved is not None and args.should_save:
            step_dir = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            directory = os.path.join(str(args.output_dir), step_dir)
            save_ema_files(directory, saved, run=self._run, global_step=state.global_step)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._avg.release()
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None:  # the Trainer just loaded its weights
            step = state.best_global_step
            if not isinstance(step, int):  # a trainer_state.json written before the field
                found = re.search(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)$", os.path.normpath(best))
                step = int(found[1]) if found else -1
            self._load(best, self._run, step, at="the best checkpoint is at")
        if self._trainer is not None:
            self._avg.finish(self._trainer.model)

    def state(self) -> dict[str, Any]:
        """What the Trainer keeps of this callback in each checkpoint's ``trainer_state.json``
        (``stateful_callbacks``, the ``ExportableState`` protocol): the run identity that the
        checkpoint's EMA files must carry. No arguments: see *Resume identity* above."""
        return {"args": {}, "attributes": {RECORD: self._run}}

    # ----------------------------------------------------------------- export
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the evaluated average with :func:`polyak.export.save_pretrained`: the model's
        own ``save_pretrained`` (same keys, config, sharded safetensors; a PEFT model's adapter
        folder), all or none, with the average's metadata in each file, so
        ``from_pretrained(save_directory)`` loads it.

        Args:
            dtype: floating dtype of the weights (default: the model's own).
            **kwargs: go to the model's ``save_pretrained`` (``max_shard_size``, ...).

        Distributed (DDP, ZeRO-3, whose partitions are gathered), every rank calls it; the
        process that writes is the one the Trainer saves from (``args.should_save``).
        """
        if self._trainer is None or self.ema is None or not self._avg.has_average():
            raise RuntimeError("EMACallback.save_pretrained: no average yet; train first")
        kwargs.setdefault("is_main_process", self._trainer.args.should_save)
        export.save_pretrained(self.ema, save_directory, self._avg.average, dtype, **kwargs)

    # ----------------------------------------------------------------- internals
    def _load(self, directory: str | os.PathLike[str], run: str, step: int, at: str) -> None:
        """Load the EMA files of ``directory`` if they are those of ``run`` at ``step``."""
        saved = read_own_files(directory, run, step, at=at)
        self._avg.load(saved.state, str(saved.path))
        self._run = run

    def _hand_back(self, trainer: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """This instance was built by the Trainer from ``trainer_state.json``
        (``restore_callback_states_from_checkpoint=True``) in place of the one the Trainer was
        given: put that one back in its place and let it begin."""
        original = None if trainer is None else vars(trainer).get(_ATTACHED)
        if not isinstance(original, EMACallback):
            raise ValueError(
                "restore_callback_states_from_checkpoint=True rebuilt EMACallback from "
                "trainer_state.json, which keeps none of its arguments (a schedule is not JSON), "
                "and no EMACallback given to Trainer(callbacks=[...]) can take its place back: "
                "pass the callback to the Trainer's constructor rather than add_callback(), or "
                "set restore_callback_states_from_checkpoint=False (the EMA is restored from its "
                "own files either way)"
            )
        callbacks = trainer.callback_handler.callbacks
        callbacks[callbacks.index(self)] = original
        original.on_train_begin(args, state, control, **kwargs)

    def _attach(self, trainer: Any) -> None:
        """Wrap the trainer's evaluate / predict / train (instance attributes)."""
        if trainer is None or trainer is self._trainer:
            return
        other = vars(trainer).get(_ATTACHED)
        if other is not None and other is not self and other in trainer.callback_handler.callbacks:
            raise ValueError(
                "one EMACallback per Trainer: both would write polyak_ema.json into each "
                "checkpoint. Keep several averages in one callback, e.g. "
                "EMACallback({'slow': 0.999, 'fast': 0.99})"
            )
        self._trainer = trainer
        vars(trainer)[_ATTACHED] = self
        evaluate, predict, train = trainer.evaluate, trainer.predict, trainer.train

        def evaluate_(
            eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
        ) -> dict[str, float]:
            datasets = trainer.eval_dataset if eval_dataset is None else eval_dataset
            if isinstance(datasets, dict) or not self._evaluates_average():
                return evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # dict: per set
            if self._avg.evaluate == "average":
                with self._avg.swapped(trainer.model):
                    return evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            return self._evaluate_both(evaluate, eval_dataset, ignore_keys, metric_key_prefix)

        def predict_(test_dataset: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._evaluates_average():
                return predict(test_dataset, *args, **kwargs)
            with self._avg.swapped(trainer.model):
                return predict(test_dataset, *args, **kwargs)

        def train_(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(trainer.args.output_dir)
            self._resume = resume_from_checkpoint or None
            try:
                return train(resume_from_checkpoint, *args, **kwargs)
            finally:
                self._resume = None

        # instance attributes shadowing the methods; Trainer.train calls self.evaluate
        vars(trainer).update(evaluate=evaluate_, predict=predict_, train=train_)

    def _evaluates_average(self) -> bool:
        return self._avg.evaluate != "live" and self._avg.has_average()

    def _evaluate_both(
        self, evaluate: Callable[..., dict[str, float]], *args: Any
    ) -> dict[str, float]:
        eval_dataset, ignore_keys, prefix = args
        trainer, ema = self._trainer, self.ema
        assert trainer is not None and ema is not None
        handler = trainer.callback_handler
        vars(handler)["on_evaluate"] = _no_event  # one on_evaluate, with every set, follows
        vars(trainer)["log"] = _no_log  # and one log_history row
        averaged: dict[str, float] = {}
        try:
            for name in ema.names:
                label = "ema" if len(ema.names) == 1 else f"ema_{name}"
                with rng_untouched(trainer.model), ema.swapped(trainer.model, name=name):
                    averaged.update(evaluate(eval_dataset, ignore_keys, f"{prefix}_{label}"))
            live = evaluate(eval_dataset, ignore_keys, prefix)
        finally:
            del vars(handler)["on_evaluate"]
            del vars(trainer)["log"]
        metrics = {**live, **averaged}
        trainer.log(metrics)
        trainer.control = handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
        return metrics


def _no_event(args: Any, state: Any, control: Any, metrics: Any) -> Any:
    return control


def _no_log(logs: Any, *args: Any, **kwargs: Any) -> None:
    """``Trainer.log`` inside one pass of ``evaluate="both"``: the caller logs every pass's
    metrics together once."""


def _find_trainer(callback: EMACallback) -> Trainer | None:
    """The Trainer whose hook is running: a ``self`` up the stack holding ``callback``."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and any(
            c is callback for c in owner.callback_handler.callbacks
        ):
            return owner
        frame = frame.f_back  # type: ignore[assignment]
    return None
