"""``polyak.train_with_ema``: a training loop that keeps and evaluates averages of the weights."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from polyak._torch.ema import EMA
from polyak._torch.naming import unwrap
from polyak.errors import NonFiniteError
from polyak.types import DecayLike
from polyak.workflows._common import (
    Forward,
    check_count,
    check_forward,
    check_loader,
    check_module,
    model_device,
    preserved_rng,
)
from polyak.workflows._epoch import evaluate_all, evaluate_average, length, train_epoch
from polyak.workflows.bn import batchnorms, load_bn
from polyak.workflows.bn import recompute_bn as _recompute_bn
from polyak.workflows.early_stopping import EarlyStopping
from polyak.workflows.evaluate import Metric, check_metrics
from polyak.workflows.progress import Progress
from polyak.workflows.write_back import WriteBack

__all__ = ["train_with_ema"]

_FINAL = ("average", "live", "best")
_NONFINITE_LOSS = ("stop", "raise", "continue")


def _labels(ema: EMA) -> dict[str, str]:
    """Average name -> label in the history: ``"ema"``, or ``"ema[<name>]"`` for several."""
    if len(ema.names) == 1:
        return {ema.names[0]: "ema"}
    return {n: f"ema[{n}]" for n in ema.names}


def train_with_ema(
    model: nn.Module,
    train_loader: Iterable[object],
    val_loader: Iterable[object],
    optimizer: torch.optim.Optimizer,
    criterion: Callable[..., torch.Tensor],
    epochs: int,
    ema_decay: DecayLike = 0.999,
    device: torch.device | str | None = None,
    *,
    ema: EMA | None = None,
    metrics: Mapping[str, Metric] | None = None,
    accumulation_steps: int = 1,
    scheduler: LRScheduler | ReduceLROnPlateau | None = None,
    scheduler_interval: Literal["epoch", "step"] = "epoch",
    recompute_bn: bool | Iterable[object] = False,
    bn_batches: int | None = None,
    early_stopping: EarlyStopping | None = None,
    final_weights: str = "average",
    progress: bool | None = None,
    forward: Forward | None = None,
    nonfinite_loss: Literal["stop", "raise", "continue"] = "stop",
    write_back: WriteBack | None = None,
) -> dict[str, list[float]]:
    """Train ``model`` with its live weights, keep averages of them, evaluate both every epoch.

    After every optimizer step the averages are updated (:meth:`polyak.EMA.update`):

        avg <- decay_t * avg + (1 - decay_t) * live

    so with gradient accumulation over ``k`` micro-batches the average moves once per ``k``
    (Morales-Brotons et al. and YOLOv5 do the same; the horizon counts optimizer steps). After
    each epoch the live weights and then each average (swapped into the model, no copy) are
    evaluated on ``val_loader`` with :func:`polyak.evaluate` (size-weighted mean loss). With
    ``recompute_bn`` the averaged model's BatchNorm statistics are recomputed before its
    evaluation (:func:`polyak.recompute_bn`); the average itself is not changed by evaluating it.
    Evaluating leaves every random stream as it found it (torch's global generator, the loaders'
    own), so options such as ``recompute_bn`` or ``metrics`` never change the training run.

    The history has one value per epoch under these keys (``<label>`` is ``ema`` for a single
    average and ``ema[<name>]`` for each of several, ``<name>`` from :attr:`polyak.EMA.names`):

    * ``epoch`` (1-based), ``steps`` (optimizer steps so far), ``lr`` (first param group, at the
      end of the epoch), ``train_loss`` (size-weighted mean over the epoch's batches, live
      weights as they were at each batch);
    * ``val_loss`` and ``val_<metric>`` for the live weights;
    * ``val_loss_<label>`` and ``val_<metric>_<label>`` for each average.

    Args:
        model: the model to train (moved to ``device`` first, if given).
        train_loader: training batches ``(inputs, target)`` (see :mod:`polyak.workflows`).
        val_loader: validation batches, same layout.
        optimizer: the optimizer over the model's parameters.
        criterion: ``criterion(outputs, targets) -> loss`` (mean over the batch).
        epochs: number of epochs (>= 1).
        ema_decay: the decay of :class:`polyak.EMA`: a float, a schedule, or a list / dict of
            them for several averages.
        device: where the model and batches go (default: the model's own device).
        ema: an existing :class:`polyak.EMA` of ``model`` to use (then leave ``ema_decay``),
            built on the model's final device; keep it to read the averages after training.
            An EMA of another model is refused.
        metrics: ``{name: fn(outputs, targets) -> float}`` over the whole validation set, e.g.
            ``{"accuracy": polyak.metrics.accuracy}``.
        accumulation_steps: micro-batches per optimizer step (and per average update). With
            more than one, each step follows the gradient of the mean loss over all samples of
            its micro-batches, as one batch of their combined size would (the sum, for a
            ``reduction="sum"`` criterion), also for a short group at the end of an epoch.
        scheduler: a learning-rate scheduler, stepped each ``scheduler_interval``;
            ``ReduceLROnPlateau`` is stepped with the live validation loss.
        scheduler_interval: ``"epoch"`` (default) or ``"step"`` (every optimizer step).
        recompute_bn: recompute the averaged model's BatchNorm statistics before evaluating it:
            ``True`` over ``train_loader``, or a loader to use instead.
        bn_batches: batches for that recomputation (default: the whole loader).
        early_stopping: an :class:`polyak.EarlyStopping`, fed ``early_stopping.monitor`` for the
            live weights (``"live"``) and each average (``<label>``); training stops when it
            says so.
        final_weights: what the model holds at the end: ``"average"`` (default, the first
            average; BatchNorm recomputed if asked), ``"live"``, ``"best"`` (the early-stopping
            best), or the name of one average. An average holding inf/nan is never copied in:
            the live weights stay, with a warning.
        progress: draw a progress bar on stderr; ``None`` (default) draws only on a terminal.
        forward: ``forward(model, batch) -> (outputs, targets)`` for other batch layouts.
        nonfinite_loss: what a batch whose loss is inf/nan does, found before its backward pass
            (one host sync per batch; nothing on a CPU): ``"stop"`` (default) ends training
            there with a warning naming the epoch and batch: that epoch is evaluated and
            recorded (its ``train_loss`` over the batches before), and the live weights and
            the averages are those of the last optimizer step, all finite; ``"raise"`` raises
            :class:`polyak.NonFiniteError` with the same weights; ``"continue"`` trains on
            (the old behaviour: one inf/nan step makes every later weight inf/nan).
        write_back: a :class:`polyak.workflows.WriteBack`: copy an average into the model at
            its steps (right after that step's update) or epoch ends (after that epoch's
            evaluation), restarting the averages if it says so (Switch EMA, PMA).

    Returns:
        The history, ``{key: [one value per epoch]}``. With several averages every
        ``val_<metric>_ema[<name>]`` series is there, and ``val_<metric>_ema`` is the first
        average's (the one ``final_weights="average"`` puts in the model).

    Raises:
        ValueError, TypeError: a bad argument, named in the message (checked before training).

    Examples:
        >>> history = polyak.train_with_ema(model, train_loader, val_loader, optimizer,
        ...                                 nn.CrossEntropyLoss(), epochs=10,
        ...                                 ema_decay=0.99)                    # doctest: +SKIP
        >>> history["val_loss"][-1], history["val_loss_ema"][-1]          # doctest: +SKIP

    References:
        Morales-Brotons, Vogels & Hendrikx, "Exponential Moving Average of Weights in Deep
        Learning: Dynamics and Benefits", TMLR 2024; Polyak & Juditsky, "Acceleration of
        Stochastic Approximation by Averaging", SIAM J. Control Optim. 1992.
    """
    check_module(model)
    check_loader(train_loader, "train_loader")
    check_loader(val_loader, "val_loader")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not callable(criterion):
        raise TypeError(f"criterion must be callable (outputs, targets) -> loss, got {criterion!r}")
    epochs = check_count(epochs, "epochs")
    accumulation_steps = check_count(accumulation_steps, "accumulation_steps")
    bn_batches = check_count(bn_batches, "bn_batches", allow_none=True)
    fns = check_metrics(metrics)
    check_forward(forward)
    if nonfinite_loss not in _NONFINITE_LOSS:
        raise ValueError(
            f"nonfinite_loss must be one of {list(_NONFINITE_LOSS)}, got {nonfinite_loss!r}"
        )
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(
            f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
        )
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError(
            f"early_stopping must be a polyak.EarlyStopping, got {type(early_stopping).__name__}"
        )
    if ema is not None:
        if not isinstance(ema, EMA):
            raise TypeError(f"ema must be a polyak.EMA, got {type(ema).__name__}")
        if not (isinstance(ema_decay, float) and ema_decay == 0.999):
            raise ValueError("pass either ema= (an EMA you built) or ema_decay=, not both")
        if unwrap(ema.model) is not unwrap(model):
            raise ValueError(
                f"ema= averages another model ({type(ema.model).__name__} at "
                f"{id(unwrap(ema.model)):#x}), not the one to train; build it as "
                "polyak.EMA(model, ...) on this model"
            )
    if device is not None:
        model.to(torch.device(device))
    if ema is None:
        ema = EMA(model, decay=ema_decay)
    labels = _labels(ema)
    if final_weights not in _FINAL and final_weights not in ema.names:
        raise ValueError(
            f"final_weights must be one of {list(_FINAL)} or an average's name "
            f"{list(ema.names)}, got {final_weights!r}"
        )
    if final_weights == "best" and (early_stopping is None or not early_stopping.keep_weights):
        raise ValueError(
            "final_weights='best' needs early_stopping=EarlyStopping(..., keep_weights=True)"
        )
    if write_back is not None:
        if not isinstance(write_back, WriteBack):
            raise TypeError(
                f"write_back must be a polyak.workflows.WriteBack, got {type(write_back).__name__}"
            )
        write_back.check(ema)
    monitors = ["val_loss", *(f"val_{m}" for m in fns)]
    if early_stopping is not None and early_stopping.monitor not in monitors:
        raise ValueError(
            f"early_stopping.monitor={early_stopping.monitor!r} is not evaluated; choose one of "
            f"{monitors} (add metrics= for others)"
        )
    bn_loader: Iterable[object] | None = None
    if recompute_bn is not False:
        bn_loader = (
            train_loader if recompute_bn is True else check_loader(recompute_bn, "recompute_bn")
        )
        if not batchnorms(model):
            warnings.warn(
                "recompute_bn: the model has no BatchNorm layer with running statistics; ignored",
                UserWarning,
                stacklevel=2,
            )
            bn_loader = None

    dev = model_device(model)
    history: dict[str, list[float]] = {k: [] for k in ("epoch", "steps", "lr", "train_loss")}
    for key in monitors:
        history[key] = []
        for label in labels.values():
            history[f"{key}_{label}"] = []
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    per_step = scheduler if scheduler_interval == "step" and not plateau else None
    flags = [(m, m.training) for m in model.modules()]
    optimizer.zero_grad(set_to_none=True)
    after_step = None
    if write_back is not None and write_back.unit == "steps":
        wb, trained = write_back, ema

        def after_step() -> None:
            wb.apply(trained, model, trained.step, "steps")

    for epoch in range(1, epochs + 1):
        bar = Progress(length(train_loader), f"epoch {epoch}/{epochs}", progress)
        train_loss, bad_batch = train_epoch(
            model, train_loader, optimizer, criterion, ema, accumulation_steps, per_step,
            forward, dev, bar, nonfinite_loss != "continue", after_step,
        )  # fmt: skip
        if bad_batch is not None:
            where = (
                f"the loss of batch {bad_batch} of epoch {epoch} is not finite; the weights are "
                f"those of optimizer step {ema.step}"
            )
            if nonfinite_loss == "raise":
                bar.close(f"epoch {epoch}/{epochs}: non-finite loss at batch {bad_batch}")
                raise NonFiniteError(f"train_with_ema: {where}", ["loss"])
            warnings.warn(
                f"train_with_ema stopped: {where}, all finite. Lower the learning rate, clip "
                "the gradients or check the data; nonfinite_loss='continue' trains on",
                UserWarning,
                stacklevel=2,
            )
        history["epoch"].append(epoch)
        history["steps"].append(ema.step)
        history["lr"].append(float(optimizer.param_groups[0]["lr"]))
        history["train_loss"].append(train_loss)
        # Evaluation must not change how training goes on: same random streams afterwards.
        with preserved_rng(
            [train_loader, val_loader, *([bn_loader] if bn_loader is not None else [])], dev
        ):
            scores = evaluate_all(model, val_loader, criterion, fns, forward)
            for k, v in scores.items():
                history[f"val_{k}"].append(v)
            if early_stopping is not None:
                early_stopping.observe("live", scores[early_stopping.monitor[4:]], model)
            for name, label in labels.items():
                with ema.swapped(model, name=name):
                    scores, saved = evaluate_average(
                        model, val_loader, criterion, fns, forward, bn_loader, bn_batches
                    )
                    if early_stopping is not None:  # sees the recomputed statistics
                        early_stopping.observe(label, scores[early_stopping.monitor[4:]], model)
                    if saved is not None:
                        load_bn(saved)
                for k, v in scores.items():
                    history[f"val_{k}_{label}"].append(v)
        bar.close(_summary(epoch, epochs, history, labels))
        if write_back is not None and bad_batch is None:
            write_back.apply(ema, model, epoch, "epochs")
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(history["val_loss"][-1])
        elif scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        if bad_batch is not None or (early_stopping is not None and early_stopping.end_epoch()):
            break
    for m, flag in flags:
        m.training = flag
    first = next(iter(labels.values()))
    if first != "ema":  # several averages: "<key>_ema" is the first one's, as final_weights uses
        for key in monitors:
            history[f"{key}_ema"] = history[f"{key}_{first}"]
    _finish(model, ema, final_weights, early_stopping, bn_loader, bn_batches, forward)
    return history


def _summary(
    epoch: int, epochs: int, history: dict[str, list[float]], labels: dict[str, str]
) -> str:
    parts = [f"epoch {epoch}/{epochs}", f"train_loss {history['train_loss'][-1]:.4f}"]
    parts.append(f"val_loss {history['val_loss'][-1]:.4f}")
    parts += [f"{label} {history[f'val_loss_{label}'][-1]:.4f}" for label in labels.values()]
    return "  ".join(parts)


def _finish(
    model: nn.Module,
    ema: EMA,
    final_weights: str,
    early_stopping: EarlyStopping | None,
    bn_loader: Iterable[object] | None,
    bn_batches: int | None,
    forward: Forward | None,
) -> None:
    if final_weights == "live":
        return
    if final_weights == "best":
        assert early_stopping is not None
        early_stopping.restore(model)
        return
    name = ema.names[0] if final_weights == "average" else final_weights
    bad = ema.nonfinite_tensors(name)
    if bad:  # never hand out a non-finite average: keep the live weights
        warnings.warn(
            f"final_weights={final_weights!r}: average {name!r} holds inf/nan in {bad[:5]}; the "
            "model keeps its live weights",
            UserWarning,
            stacklevel=3,
        )
        return
    ema.copy_to(model, name=name)
    if bn_loader is not None:
        _recompute_bn(model, bn_loader, bn_batches, forward)
