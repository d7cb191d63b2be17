"""``polyak.ensemble_predictions``: average the predictions of several checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from polyak._torch.naming import canonical_name, check_tensors
from polyak.workflows._common import (
    Forward,
    check_forward,
    check_loader,
    check_module,
    eval_mode,
    model_device,
    run_forward,
    to_device,
)

__all__ = ["EnsemblePredictions", "ensemble_predictions"]

_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


class EnsemblePredictions(NamedTuple):
    """Mean predictions of an ensemble, in loader order."""

    probs: torch.Tensor
    """``(N, ...)``: the mean over members of ``transform(outputs)`` (CPU)."""
    targets: torch.Tensor | None
    """``(N, ...)`` targets from the batches (CPU), ``None`` when the batches have none."""


@contextlib.contextmanager
def _loaded(template: nn.Module, state: Mapping[str, Any], index: int) -> Iterator[nn.Module]:
    """``template`` holding ``state``'s tensors (pointer swaps, no copy when dtype/device match);
    its own tensors come back on exit."""
    if not isinstance(state, Mapping):
        raise TypeError(f"member {index} is a {type(state).__name__}, not a module or state dict")
    ours: dict[str, torch.Tensor] = {}
    for name, t in template.state_dict(keep_vars=True).items():
        ours.setdefault(canonical_name(name), t)
    theirs = {canonical_name(k): v for k, v in state.items()}
    check_tensors(ours, theirs, f"the state dict of member {index}")
    seen: set[int] = set()
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for name, t in ours.items():
            if id(t) in seen:  # tied weights: the first name decides
                continue
            seen.add(id(t))
            saved.append((t, t.data))
            t.data = theirs[name].detach().to(t.device, t.dtype)
        yield template
    finally:
        for t, data in reversed(saved):
            t.data = data


def _predict(
    model: nn.Module,
    loader: Iterable[object],
    device: torch.device | None,
    forward: Forward | None,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dev = device if device is not None else model_device(model)
    preds, targets = [], []
    with eval_mode(model):
        for batch in loader:
            outputs, target = run_forward(model, to_device(batch, dev), forward)
            if not isinstance(outputs, torch.Tensor):
                raise TypeError(
                    f"the model returned a {type(outputs).__name__}, not a tensor; pass forward="
                )
            preds.append(transform(outputs.detach().double()).cpu())
            if isinstance(target, torch.Tensor):
                targets.append(target.detach().cpu())
    if not preds:
        raise ValueError("the loader yielded no batch: nothing to predict")
    return torch.cat(preds), torch.cat(targets) if len(targets) == len(preds) else None


@torch.no_grad()
def ensemble_predictions(
    models_or_state_dicts: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    loader: Iterable[object],
    *,
    model: nn.Module | None = None,
    transform: Literal["softmax", "sigmoid", "identity"]
    | Callable[[torch.Tensor], torch.Tensor] = "softmax",
    device: torch.device | str | None = None,
    forward: Forward | None = None,
) -> EnsemblePredictions:
    """Average the predicted probabilities of several checkpoints (a checkpoint ensemble).

    With members ``f_1..f_K`` and ``p_k(x) = softmax(f_k(x))``:

        p(x) = (1/K) * sum_k p_k(x)

    This is the alternative to weight averaging that the EMA/SWA literature compares with: an
    ensemble costs ``K`` forward passes per prediction, an average of the weights costs one.
    Members may be modules or state dicts (e.g. saved checkpoints, ``ema.averaged_tensors()``);
    a state dict is evaluated in the ``model`` template by swapping tensor pointers (matched by
    canonical name, names and shapes checked), and the template gets its own tensors back.
    Every member runs in eval mode under ``torch.no_grad()``; probabilities are computed and
    averaged in float64.

    Args:
        models_or_state_dicts: the members, a non-empty sequence of modules or state dicts.
        loader: batches in a fixed order (no shuffling); ``(inputs, target)`` tuples also return
            the targets.
        model: the template module for state-dict members.
        transform: ``"softmax"`` (class probabilities, default), ``"sigmoid"`` (multi-label),
            ``"identity"`` (regression: the mean prediction) or a callable on the outputs.
        device: where to move the batches (default: each member's device).
        forward: ``forward(model, batch) -> (outputs, targets)`` for other batch layouts.

    Returns:
        :class:`EnsemblePredictions` ``(probs, targets)`` on the CPU, ``probs`` in float32.

    Raises:
        TypeError: a member is neither a module nor a state dict; a state dict without
            ``model``; a bad ``transform``.
        ValueError: no member; a state dict that does not fit the template (names the tensor);
            members that saw different targets (a shuffling loader).

    Examples:
        >>> import torch, polyak
        >>> net = torch.nn.Linear(4, 3)
        >>> checkpoints = [{k: v + i for k, v in net.state_dict().items()} for i in range(3)]
        >>> test_loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
        >>> probs, labels = polyak.ensemble_predictions(checkpoints, test_loader, model=net)
        >>> probs.shape, labels.shape
        (torch.Size([16, 3]), torch.Size([16]))
        >>> accuracy = polyak.metrics.accuracy(probs.numpy(), labels.numpy())

    References:
        Huang et al., "Snapshot Ensembles: Train 1, get M for free", ICLR 2017; Izmailov et al.,
        "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018 (SWA vs
        ensembling).
    """
    if isinstance(models_or_state_dicts, (nn.Module, Mapping)) or not isinstance(
        models_or_state_dicts, Sequence
    ):
        raise TypeError(
            "models_or_state_dicts must be a sequence (list) of modules or state dicts, got "
            f"{type(models_or_state_dicts).__name__}"
        )
    members = list(models_or_state_dicts)
    if not members:
        raise ValueError("models_or_state_dicts is empty: an ensemble needs at least one member")
    check_loader(loader)
    check_forward(forward)
    if model is not None:
        check_module(model, "model (the template)")
    if isinstance(transform, str):
        if transform not in _TRANSFORMS:
            raise ValueError(f"transform must be one of {sorted(_TRANSFORMS)} or a callable")
        fn = _TRANSFORMS[transform]
    elif callable(transform):
        fn = transform
    else:
        raise TypeError(f"transform must be a string or a callable, got {transform!r}")
    for i, m in enumerate(members):
        if not isinstance(m, (nn.Module, Mapping)):
            raise TypeError(f"member {i} is a {type(m).__name__}, not a module or state dict")
        if isinstance(m, Mapping) and model is None:
            raise TypeError(f"member {i} is a state dict: pass the module to load it in, model=")
    dev = None if device is None else torch.device(device)

    total: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    for i, member in enumerate(members):
        with contextlib.ExitStack() as stack:
            net = (
                member
                if isinstance(member, nn.Module)
                else stack.enter_context(
                    _loaded(model, member, i)  # type: ignore[arg-type]
                )
            )
            probs, tgt = _predict(net, loader, dev, forward, fn)
        if total is None:
            total, targets = probs, tgt
            continue
        if probs.shape != total.shape:
            raise ValueError(
                f"member {i} predicted shape {tuple(probs.shape)}, member 0 {tuple(total.shape)}"
            )
        if (targets is None) != (tgt is None) or (
            targets is not None and tgt is not None and not torch.equal(targets, tgt)
        ):
            raise ValueError(
                f"member {i} saw other targets than member 0: the loader must not shuffle"
            )
        total += probs
    assert total is not None
    mean = total / len(members)
    return EnsemblePredictions(mean.to(torch.float32), targets)
