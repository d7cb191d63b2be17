"""Lightning: :class:`EMACallback` keeps averages of the weights during ``Trainer.fit`` and
evaluates them in validation, test and predict.

Works with ``lightning`` (``import lightning.pytorch``) and the standalone ``pytorch_lightning``
package (used when ``lightning`` is not installed); Lightning calls callbacks by hook name, so
the class fits either package's ``Trainer``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from polyak import export
from polyak.errors import CheckpointError
from polyak.integrations._checkpoint_entry import (
    MARKER,
    check_entry,
    checkpoint_step,
    fill_from_state_dict,
    make_entry,
)
from polyak.integrations._common import Averaging, rng_untouched
from polyak.types import DecayLike, EMAOptions
from polyak.workflows.write_back import WriteBack

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from polyak import EMA

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone package
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "polyak.integrations.lightning needs Lightning: pip install 'polyak[lightning]'"
        ) from e

__all__ = ["EMACallback"]

_Run = Callable[[], list[dict[str, Any]]]


class EMACallback(pl.Callback):
    """Averages of the weights in ``Trainer.fit``, evaluated in validation, test and predict.

    After every optimizer step the callback applies, to every tracked tensor of every average,

        avg <- decay_t * avg + (1 - decay_t) * live

    through a :class:`polyak.EMA` (fp32 flat storage, schedules over optimizer steps, exact
    resume). Hooks:

    * ``on_train_start``: builds the EMA on the LightningModule as the strategy set it up
      (DDP-wrapped, FSDP2-sharded in ``configure_model``, on its device), after every
      ``on_fit_start`` hook and checkpoint restore, and loads the state the checkpoint brought
      (a second ``fit`` of the same module continues the same EMA); starts counting the steps
      the first optimizer really takes.
    * ``on_train_batch_end``: one update covering the optimizer steps since the last one, so
      ``accumulate_grad_batches`` is respected and a step a gradient scaler skipped (inf/NaN
      gradients under ``16-mixed``) does not count.
    * ``on_{validation,test,predict}_epoch_start`` / ``_epoch_end``: swap the evaluated average
      into the model and back (pointer swap, no copy); never during the sanity check or before
      the first update, when the live weights are evaluated.
    * ``state_dict`` / ``load_state_dict``: the whole ``EMA.state_dict()`` (schedule position
      included) in the checkpoint, so ``fit(ckpt_path=...)`` resumes bit for bit; under FSDP2 the
      full tensors, gathered once per checkpoint. The entry records the trainer's
      ``global_step`` it was taken at; when a checkpoint is loaded, the entry is checked
      against its schema and that step must equal the checkpoint's own ``global_step``
      (an entry grafted from another checkpoint is a :class:`polyak.CheckpointError`).
    * ``on_save_checkpoint`` / ``on_load_checkpoint`` (``save_average_as_weights=True``): the
      checkpoint's ``state_dict`` holds the average (:func:`polyak.export.averaged_state_dict`),
      the live weights move into the callback's entry and are put back when ``fit`` resumes.
      The average is not kept a second time in the entry (the tensors whose dtype the
      ``state_dict`` keeps are taken from it on resume): two model-size copies, as Lightning's
      ``EMAWeightAveraging``. Such a checkpoint is marked twice: a top-level
      ``"polyak_state_dict"`` (``{"holds": "average", ...}``) and an entry under ``callbacks``
      whose key says so, which Lightning's own warning names when the checkpoint is resumed
      without this callback (which would train on from the average).
    * ``should_update(step_idx=..., epoch_idx=...)``: called after each optimizer step and at
      each epoch end, as Lightning's ``WeightAveraging.should_update``; the default updates
      after every step. Override it to update less often: the steps in between are covered by
      the next update (``decay**k``, the horizon does not change). ``start_epoch=E``: the
      average starts as a copy of the weights when epoch ``E`` starts (Lightning's
      ``update_starting_at_epoch``); before, the live weights are evaluated.
    * ``on_fit_end``: copies an average into the model if ``final_weights`` asks.

    ``evaluate="both"`` runs each validation (and ``trainer.validate``/``test``) twice: the
    average first, then the live weights. What the LightningModule logs in the averaged pass is
    renamed with the suffix ``_ema`` (``val_loss`` -> ``val_loss_ema``), or ``_ema[<name>]``
    when several averages are kept (``val_loss_ema[slow]``), so both sets of metrics reach the
    loggers, ``trainer.callback_metrics`` and the returned results. Only this callback and the
    progress bar see the averaged pass; the others (``ModelCheckpoint``, ``EarlyStopping``) run
    once, in the live pass, and can monitor either name. ``predict`` uses the average.

    Args:
        decay: a float, a schedule from :mod:`polyak.schedules`, or a sequence / dict of them
            (several averages), as for :class:`polyak.EMA`.
        evaluate: ``"average"`` (default), ``"live"`` or ``"both"``.
        average: name of the average evaluated, exported or copied (default: the first).
        final_weights: what the model holds after ``fit``: ``"live"`` (default), ``"average"``
            (the evaluated one) or an average's name.
        write_back: a :class:`polyak.workflows.WriteBack`: copy an average into the trained
            model at its optimizer steps (after that step's update) or epoch ends
            (``on_train_epoch_end``, after validation), restarting
            the averages if it says so (Switch EMA, PMA). A decay may be a BEMA average
            (:func:`polyak.averages.bema`): evaluation and exports then use its corrected weights.
        save_average_as_weights: write the average as the checkpoint's ``state_dict`` (so
            ``Module.load_from_checkpoint`` gives it), keeping the live weights for resume in the
            callback's entry. Checkpoints saved with ``save_weights_only=True`` get no callback
            hooks from Lightning and keep the live weights; not available under FSDP2.
        start_epoch: the epoch (0-based) at whose start the average begins (default 0).
        **ema_kwargs: any other :class:`polyak.EMA` argument (``buffers``, ``update_every``,
            ``start_step``, ``include``, ``dtype``, ...).

    Examples:
        >>> import lightning.pytorch as L                                  # doctest: +SKIP
        >>> from polyak.integrations.lightning import EMACallback
        >>> cb = EMACallback(decay=0.999, evaluate="both")                 # doctest: +SKIP
        >>> trainer = L.Trainer(callbacks=[cb], accumulate_grad_batches=4) # doctest: +SKIP
        >>> trainer.fit(module, datamodule)                                # doctest: +SKIP
        >>> trainer.callback_metrics["val_loss_ema"], cb.ema.step           # doctest: +SKIP

    References:
        Morales-Brotons, Vogels & Hendrikx, "Exponential Moving Average of Weights in Deep
        Learning: Dynamics and Benefits", TMLR 2024. Lightning's own
        ``lightning/pytorch/callbacks/weight_averaging.py`` validates on the initial copy before
        the first update (Lightning issue #21724), never averages for test or predict, and keeps
        a second copy of the model in the checkpoint.
    """

    def __init__(
        self,
        decay: DecayLike = 0.999,
        *,
        evaluate: Literal["average", "live", "both"] = "average",
        average: str | None = None,
        final_weights: str = "live",
        save_average_as_weights: bool = False,
        write_back: WriteBack | None = None,
        start_epoch: int = 0,
        **ema_kwargs: Unpack[EMAOptions],
    ) -> None:
        if not isinstance(save_average_as_weights, bool):
            raise TypeError(
                f"save_average_as_weights must be True or False, got {save_average_as_weights!r}"
            )
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an int >= 0, got {start_epoch!r}")
        self.start_epoch = start_epoch
        self._avg = Averaging(
            decay,
            evaluate=evaluate,
            average=average,
            final_weights=final_weights,
            ema_kwargs=ema_kwargs,
            owner="EMACallback",
            write_back=write_back,
        )
        self.save_average_as_weights = save_average_as_weights
        # Lightning reads the key at every hook call: build the string once
        self._state_key = self._generate_state_key(averages=list(self._avg.names))
        self._model: nn.Module | None = None  # the module the EMA was built on
        self._swapped = False
        self._averaged_pass = False  # inside the averaged pass of evaluate="both"
        self._wrapped: tuple[Any, _Run] | None = None  # (loop, its own run)
        self._trainer: pl.Trainer | None = None  # the trainer of the current stage
        self._loaded_step: int | None = None  # the global step of the pending state
        self._checkpoint: tuple[str, int] | None = None  # (where, global_step) being loaded

    @property
    def ema(self) -> EMA | None:
        """The :class:`polyak.EMA` (``None`` until ``fit`` starts or a checkpoint is loaded)."""
        return self._avg.ema

    def _built(self) -> EMA:
        assert self._avg.ema is not None, "the EMA is built at fit start"
        return self._avg.ema

    @property
    def state_key(self) -> str:
        return self._state_key

    # ----------------------------------------------------------------- training
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self._avg.evaluate == "both":
            self._wrap_evaluation(trainer, stage)
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(c, _Marked) for c in callbacks):  # see _Marked
            callbacks.append(_Marked())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise ValueError("EMACallback: the LightningModule configures no optimizer to follow")
        if self.ema is None and trainer.current_epoch < self.start_epoch:
            return  # the average starts with epoch start_epoch
        self._start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is None and trainer.current_epoch >= self.start_epoch:
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is None or self._model is not pl_module:
            self._build(pl_module)
        self._avg.count_steps(trainer.optimizers[0])
        if self.save_average_as_weights and any(t.sharded for t in self._built().layout().values()):
            raise ValueError(
                "EMACallback(save_average_as_weights=True) is not available for an FSDP2-sharded "
                "model (its checkpoint is sharded); export the average with "
                "cb.ema.state_dict(full=True) instead"
            )

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update the averages now: after the optimizer step ``step_idx`` (0-based,
        ``epoch_idx`` is ``None``) or at the end of epoch ``epoch_idx`` (``step_idx`` is
        ``None``), as Lightning's ``WeightAveraging.should_update``. Default: after every
        step. The steps an update skips are covered by the next one (``decay**k``)."""
        return step_idx is not None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self.should_update(step_idx=trainer.global_step - 1):
            self._avg.update()
        if self._avg.write_back is not None and self.ema is not None:  # after that update
            self._avg.write_back_after(pl_module, "steps", trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_update(epoch_idx=trainer.current_epoch):
            self._avg.update()
        self._avg.write_back_after(pl_module, "epochs", trainer.current_epoch + 1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._avg.release()
        self._avg.finish(pl_module)

    def on_exception(self, *args: Any) -> None:
        self._avg.release()
        self._clean_up()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._clean_up()

    def _clean_up(self) -> None:
        """The live weights back in the model, the evaluation loop's own ``run`` back, the
        trainer's callbacks as they were."""
        self._swap_out()
        trainer: Any = self._trainer
        if trainer is not None:
            trainer.callbacks = [c for c in trainer.callbacks if type(c) is not _Marked]
        if self._wrapped is not None:
            loop, _ = self._wrapped
            del vars(loop)["run"]
            self._wrapped = None

    def _build(self, pl_module: pl.LightningModule) -> None:
        self._avg.build(pl_module)
        self._model = pl_module

    # ----------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    def on_validation_epoch_end(self, *args: Any) -> None:
        self._swap_out()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    def on_test_epoch_end(self, *args: Any) -> None:
        self._swap_out()

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    def on_predict_epoch_end(self, *args: Any) -> None:
        self._swap_out()

    def _has_average(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether an average exists to evaluate now (built from a checkpoint if need be)."""
        if self.ema is None and self._avg.pending is not None:
            self._build(pl_module)  # validate/test/predict(ckpt_path=...) without fit
        if trainer.sanity_checking or self._avg.evaluate == "live":
            return False
        return self._avg.has_average()

    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._has_average(trainer, pl_module):
            return
        if self._avg.evaluate == "both" and not (self._averaged_pass or trainer.predicting):
            return  # the live pass
        self._built().apply_shadow(pl_module, name=self._avg.average)
        self._swapped = True

    def _swap_out(self) -> None:
        if self._swapped:
            self._swapped = False
            self._built().restore()

    def _wrap_evaluation(self, trainer: pl.Trainer, stage: str) -> None:
        """Make the stage's evaluation loop run an averaged pass before its own (live) one."""
        loops = {
            "fit": trainer.fit_loop.epoch_loop.val_loop,
            "validate": trainer.validate_loop,
            "test": trainer.test_loop,
        }
        if stage not in loops or self._wrapped is not None:
            return
        loop, run = loops[stage], loops[stage].run

        def run_both() -> list[dict[str, Any]]:
            if not self._has_average(trainer, trainer.lightning_module):
                return run()
            averaged = self._averaged_run(trainer, run)
            return [{**live, **avg} for live, avg in zip(run(), averaged)]  # per dataloader

        vars(loop)["run"] = run_both  # shadows the method until teardown
        self._wrapped = (loop, run)

    def _averaged_run(self, trainer: Any, run: _Run) -> list[dict[str, Any]]:
        """One run of the evaluation loop on the average, its metrics renamed."""
        module = trainer.lightning_module
        log, own = module.log, vars(module).get("log")
        suffix = f"_{self._avg.label}"

        def renamed(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            log(f"{name}{suffix}", value, *args, **kwargs)

        callbacks = trainer.callbacks
        trainer.callbacks = [
            c for c in callbacks if c is self or isinstance(c, pl.callbacks.ProgressBar)
        ]
        vars(module)["log"] = renamed  # shadows the method; log_dict calls it too
        self._averaged_pass = True
        try:
            with rng_untouched(module):
                return run()
        finally:
            self._averaged_pass = False
            trainer.callbacks = callbacks
            if own is None:
                del vars(module)["log"]
            else:
                vars(module)["log"] = own

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            if self._avg.pending is None or self._loaded_step is None:
                return {}
            return make_entry(self._avg.pending, self._loaded_step)
        if self._trainer is None:
            raise RuntimeError("EMACallback.state_dict(): no Trainer has set this callback up")
        state = self._avg.checkpoint_state()  # Lightning calls this on every rank
        return {} if state is None else make_entry(state, self._trainer.global_step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an entry :meth:`state_dict` wrote, after checking its schema and, when
        Lightning loads it from a checkpoint, that it was taken at the checkpoint's step."""
        where, step = self._checkpoint or ("EMACallback.load_state_dict()", None)
        self._checkpoint = None
        entry = check_entry(state_dict, where, step)
        if "in_state_dict" in entry:  # on_load_checkpoint fills it from the checkpoint
            raise CheckpointError(
                f"{where}: the average {entry['in_state_dict']['average']!r} is kept in the "
                "checkpoint's state_dict (save_average_as_weights=True): resume through "
                "Trainer.fit(ckpt_path=...), which reads both"
            )
        self._avg.load(entry["ema"], f"{where}['ema']")
        self._loaded_step = entry["global_step"]

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.save_average_as_weights or not self._avg.has_average():
            return
        name = self._avg.average
        averaged = export.averaged_state_dict(self._built(), name)
        callbacks = checkpoint.setdefault("callbacks", {})
        entry = callbacks.setdefault(self.state_key, {})
        ema = entry.get("ema")
        if isinstance(ema, dict) and name in ema.get("averages", {}):
            table = ema["averages"][name]  # kept once, in the state_dict, where it is exact
            shared = [
                k
                for k, v in table.items()
                if k in averaged and averaged[k].dtype == v.dtype and averaged[k].shape == v.shape
            ]
            rest = {k: v for k, v in table.items() if k not in set(shared)}
            entry["ema"] = {**ema, "averages": {**ema["averages"], name: rest}}
            entry["in_state_dict"] = {"average": name, "names": shared}
        entry["live_state_dict"], checkpoint["state_dict"] = checkpoint["state_dict"], averaged
        marker = {"holds": "average", "average": name, "callback": self.state_key}
        checkpoint[MARKER], callbacks[_Marked.KEY] = marker, marker

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        entry = states.get(self.state_key)
        if entry is not None:  # checked before anything is used; load_state_dict follows
            where = f"{trainer.ckpt_path or 'the checkpoint'}: callbacks[{self.state_key!r}]"
            step = checkpoint_step(checkpoint, str(trainer.ckpt_path or "the checkpoint"))
            check_entry(entry, where, step)
            fill_from_state_dict(entry, checkpoint.get("state_dict"), where)
            self._checkpoint = (where, step)
        if trainer.state.fn != "fit":
            return  # validate/test/predict(ckpt_path=...) evaluate what the checkpoint holds
        if entry is None:
            others = [k for k in states if k.startswith(type(self).__qualname__)]
            if others:
                raise CheckpointError(
                    f"EMACallback: the checkpoint holds the state of {others}, not of this "
                    f"callback's averages {list(self._avg.names)}; resume with the same decay"
                )
            warnings.warn(
                "EMACallback: the checkpoint has no EMACallback state; the average starts anew "
                "from the checkpoint's weights",
                UserWarning,
                stacklevel=2,
            )
        elif "live_state_dict" in entry:  # save_average_as_weights: resume from live weights
            trainer.strategy.load_model_state_dict(
                {"state_dict": entry["live_state_dict"]}, strict=pl_module.strict_loading
            )


class _Marked(pl.Callback):
    """Owns the entry ``on_save_checkpoint`` adds under ``callbacks`` to a checkpoint whose
    ``state_dict`` holds an average. Lightning warns, naming every entry of a checkpoint that
    no callback of the resuming ``Trainer`` owns: without ``EMACallback`` (whose ``setup`` adds
    this one) the warning quotes :attr:`KEY`; with it, nothing is said."""

    KEY = (
        "polyak: the state_dict of this checkpoint holds an EMA average, not the training "
        "weights; resume it with polyak's EMACallback(save_average_as_weights=True), which puts "
        "the training weights back"
    )

    @property
    def state_key(self) -> str:
        return self.KEY
