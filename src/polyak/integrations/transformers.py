"""Hugging Face ``transformers``: :class:`EMACallback` keeps averages of the weights in the
``Trainer``, evaluates them, saves them in every checkpoint and resumes them.

With Accelerate alone no callback is needed: a :class:`polyak.EMA` has ``state_dict`` /
``load_state_dict``, so ``accelerator.register_for_checkpointing(ema)`` makes
``accelerator.save_state`` / ``load_state`` carry it (``examples/accelerate_ema.py``).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

from polyak.integrations._common import Averaging, rng_untouched, state_dict_of_average
from polyak.integrations._ema_files import load_ema_files, save_ema_files

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "polyak.integrations.transformers needs transformers: pip install 'polyak[transformers]'"
    ) from e

__all__ = ["EMACallback"]


class EMACallback(TrainerCallback):
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
      resuming, loads the EMA state of that checkpoint; starts counting the optimizer's steps.
    * ``on_step_end``: one update per optimizer step (``gradient_accumulation_steps`` respected;
      a step a gradient scaler skipped does not count).
    * ``evaluate()`` (direct, or periodic through ``eval_strategy``): on the average
      (``evaluate="average"``), the live weights (``"live"``), or both (``"both"``): the
      averaged pass uses ``metric_key_prefix`` + ``"_ema"`` (``eval_ema_loss``; with several
      averages ``eval_ema[<name>]_loss``), and ``on_evaluate`` fires once with both sets, so
      ``metric_for_best_model="ema_loss"`` and ``EarlyStoppingCallback`` see them. The
      weights are swapped (pointers, no copy) and always given back bit for bit; never swapped
      before the first update. ``predict()`` uses the average unless ``evaluate="live"``.
    * ``on_save``: writes ``checkpoint-N/polyak_ema.safetensors`` (tensors) and
      ``polyak_ema.json`` (step counters, schedule state, run identity, checksum) atomically
      after the Trainer wrote the checkpoint.
    * ``on_train_end``: with ``load_best_model_at_end``, loads the best checkpoint's EMA as
      well; then copies an average into the model if ``final_weights`` asks (so
      ``trainer.save_model()`` saves it).

    Args:
        decay: a float, a schedule from :mod:`polyak.schedules`, or a sequence / dict of them
            (several averages), as for :class:`polyak.EMA`.
        evaluate: ``"average"`` (default), ``"live"`` or ``"both"``.
        average: name of the average evaluated, exported or copied (default: the first).
        final_weights: what the model holds after training: ``"live"`` (default),
            ``"average"`` (the evaluated one) or an average's name.
        **ema_kwargs: any other :class:`polyak.EMA` argument.

    Example:
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
        decay: Any = 0.999,
        *,
        evaluate: str = "average",
        average: str | None = None,
        final_weights: str = "live",
        **ema_kwargs: Any,
    ) -> None:
        self._avg = Averaging(
            decay,
            evaluate=evaluate,
            average=average,
            final_weights=final_weights,
            ema_kwargs=ema_kwargs,
            owner="EMACallback",
        )
        self._trainer: Any = None  # the Trainer found by on_init_end / on_train_begin
        self._run = uuid.uuid4().hex
        self._resume: str | None = None  # the checkpoint train() was asked to resume from

    @property
    def ema(self) -> Any:
        """The :class:`polyak.EMA` (``None`` until training starts)."""
        return self._avg.ema

    # ----------------------------------------------------------------- hooks
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._attach(_find_trainer(self))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trainer is None:  # added with trainer.add_callback()
            self._attach(_find_trainer(self))
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
            self._load(self._resume or os.path.join(args.output_dir, step_dir))
        self._avg.count_steps(kwargs["optimizer"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._avg.update()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ema is None:
            return
        saved = self._avg.checkpoint_state()  # on every rank: a collective under FSDP2
        if saved is not None and args.should_save:
            step_dir = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_ema_files(os.path.join(args.output_dir, step_dir), saved, self._run)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._avg.release()
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            self._load(state.best_model_checkpoint)  # the Trainer just loaded its weights
        if self._trainer is not None:
            self._avg.finish(self._trainer.model)

    # ----------------------------------------------------------------- export
    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write the evaluated average with the model's own ``save_pretrained`` (same keys,
        dtype, config, sharded safetensors), so ``from_pretrained(save_directory)`` loads it.

        ``kwargs`` go to ``save_pretrained`` (``max_shard_size``, ``is_main_process``, ...).
        """
        if self._trainer is None or not self._avg.has_average():
            raise RuntimeError("EMACallback.save_pretrained: no average yet; train first")
        model = self._trainer.model
        state = state_dict_of_average(self._avg, model)
        model.save_pretrained(save_directory, state_dict=state, **kwargs)

    # ----------------------------------------------------------------- internals
    def _load(self, directory: str | os.PathLike[str]) -> None:
        state, run = load_ema_files(directory)
        self._avg.load(state)
        self._run = run

    def _attach(self, trainer: Any) -> None:
        """Wrap the trainer's evaluate / predict / train (instance attributes)."""
        if trainer is None or trainer is self._trainer:
            return
        self._trainer = trainer
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
        trainer = self._trainer
        assert trainer is not None
        handler = trainer.callback_handler
        vars(handler)["on_evaluate"] = _no_event  # one on_evaluate, with both sets, follows
        try:
            with rng_untouched(trainer.model), self._avg.swapped(trainer.model):
                averaged = evaluate(eval_dataset, ignore_keys, f"{prefix}_{self._avg.label}")
            live = evaluate(eval_dataset, ignore_keys, prefix)
        finally:
            del vars(handler)["on_evaluate"]
        metrics = {**live, **averaged}
        trainer.control = handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
        return metrics


def _no_event(args: Any, state: Any, control: Any, metrics: Any) -> Any:
    return control


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
