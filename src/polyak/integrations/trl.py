"""TRL: :class:`ReferenceCallback` keeps the reference model of DPO-family trainers as a polyak
average of the policy, resumable and PEFT-aware.

TR-DPO (Gorbatovski et al., 2024, "Learn Your Reference Model for Real Good Alignment") moves the
reference towards the policy every ``sync_steps`` optimizer steps:

    ref <- alpha * policy + (1 - alpha) * ref        (soft; alpha = 1: hard, ref <- policy)

which is one EMA update of decay ``1 - alpha`` per period. TRL implements it in
``trl/trainer/callbacks.py`` (``SyncRefModelCallback``, ``DPOConfig(sync_ref_model=True)``)
without resume and without PEFT (``sync_ref_model`` with a PEFT model is refused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from polyak._timeline import parse_decays
from polyak.averages import BEMA
from polyak.integrations.transformers import EMACallback, _find_trainer
from polyak.schedules import Schedule
from polyak.types import DecayLike, EMAOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

try:
    import trl  # noqa: F401  (the trainers this callback serves)
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("polyak.integrations.trl needs TRL: pip install 'polyak[trl]'") from e

__all__ = ["REFERENCE_ADAPTER", "ReferenceCallback"]

REFERENCE_ADAPTER = "ref"  # the adapter TRL's DPOTrainer evaluates as the reference of a PEFT model


class _Mixup(Schedule):
    """TR-DPO's soft update as a schedule: decay ``1 - alpha`` per update, whatever the gap
    (one update per ``sync_steps`` optimizer steps, through ``update_every``)."""

    kind = "tr_dpo"

    def __init__(self, alpha: float) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"mixup_alpha must be a number in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def _step(self, t: int) -> float:
        return 1.0 - self.alpha

    def _gap(self, t: int, dt: int) -> float:
        return 1.0 - self.alpha

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    @property
    def name(self) -> str:
        return f"tr_dpo(alpha={self.alpha})"


class ReferenceCallback(EMACallback):
    """The reference model of a TRL trainer (``DPOTrainer`` and the others that keep a
    ``ref_model``) kept as a polyak average of the policy.

    TR-DPO (default, ``decay=None``): every ``sync_steps`` optimizer steps (global steps
    ``sync_steps, 2*sync_steps, ...``, as TRL's ``SyncRefModelCallback``),

        ref <- ref + mixup_alpha * (policy - ref)         (= alpha*policy + (1-alpha)*ref)

    and the reference *is* the average: the trainer's ``ref_model`` is replaced by
    :meth:`polyak.EMA.get_module` (views of the average, no copy), started from the weights of
    the ``ref_model`` given to the trainer. ``mixup_alpha=1`` is TR-DPO's hard update.

    Another kind of average (``decay=``, any :mod:`polyak.schedules` schedule, or a BEMA
    average, :func:`polyak.averages.bema`): the average is updated after every optimizer step
    (or every ``update_every``) and copied into the reference every ``sync_steps`` steps; a
    BEMA reference is the corrected ``EMA_t + alpha_t (policy_t - policy_0)`` of the sync step.

    PEFT: with a ``PeftModel`` policy and no ``ref_model`` (TRL then evaluates the reference as
    the base model with the adapter disabled), the reference is kept as an averaged adapter:
    an adapter named :data:`REFERENCE_ADAPTER` (``"ref"``) is added beside the trained one,
    which ``DPOTrainer`` evaluates as the reference instead of disabling the adapters. It
    starts as the trained adapter (LoRA's zero-initialised ``B`` makes that the base model,
    as TRL's) and receives the averaged adapter at each sync. The frozen base is neither
    averaged nor copied.

    Resume: the average is saved in every checkpoint and resumed as
    :class:`polyak.integrations.transformers.EMACallback` does (run identity, files read as
    untrusted); in TR-DPO mode the reference is the average, so it resumes exactly. With
    ``decay=`` the reference is the average as of the resume until the next sync.

    One polyak callback per ``Trainer``: this one is an ``EMACallback`` (evaluating the live
    weights); keep evaluation averages as further averages of a separate model if needed.

    Args:
        mixup_alpha: TR-DPO's ``alpha`` (``DPOConfig.ref_model_mixup_alpha``, 0.6 there).
        sync_steps: the period in optimizer steps (``DPOConfig.ref_model_sync_steps``, 512).
        decay: ``None`` (TR-DPO), or the schedule of an average updated every step.
        **ema_kwargs: other :class:`polyak.EMA` arguments (``dtype``, ``buffers``, ...).

    Examples:
        >>> from polyak.integrations.trl import ReferenceCallback         # doctest: +SKIP
        >>> cb = ReferenceCallback(mixup_alpha=0.6, sync_steps=512)        # doctest: +SKIP
        >>> DPOTrainer(model, ref_model=ref, args=args, callbacks=[cb], ...)  # doctest: +SKIP

    References:
        Gorbatovski et al., "Learn Your Reference Model for Real Good Alignment", 2024 (TR-DPO);
        TRL's ``trl/trainer/callbacks.py`` (``SyncRefModelCallback``) and ``dpo_trainer.py``
        (the ``"ref"`` adapter of a PEFT model).
    """

    def __init__(
        self,
        mixup_alpha: float = 0.6,
        sync_steps: int = 512,
        *,
        decay: DecayLike | None = None,
        **ema_kwargs: Unpack[EMAOptions],
    ) -> None:
        if isinstance(sync_steps, bool) or not isinstance(sync_steps, int) or sync_steps < 1:
            raise ValueError(f"sync_steps must be an int >= 1, got {sync_steps!r}")
        mixup = _Mixup(mixup_alpha)
        self.sync_steps = sync_steps
        self.tr_dpo = decay is None
        if self.tr_dpo:
            if "update_every" in ema_kwargs:
                raise TypeError("TR-DPO updates every sync_steps: pass no update_every")
            ema_kwargs["update_every"] = sync_steps
        super().__init__(mixup if decay is None else decay, evaluate="live", **ema_kwargs)
        if len(self._avg.names) != 1:
            raise ValueError("ReferenceCallback keeps one average: pass one decay")
        self._reference: Any = None  # the trainer's ref_model (a copy target), if any
        self._pairs: list[tuple[torch.Tensor, str]] = []  # (adapter "ref", average's name)
        # a BEMA average is read corrected (a new buffer), a plain one through its views
        self._corrected = decay is not None and isinstance(parse_decays(decay)[1][0], BEMA)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer or _find_trainer(self)
        policy = None if trainer is None else trainer.model  # unwrapped: model_wrapped is not
        peft = (
            policy is not None
            and getattr(trainer, "ref_model", None) is None
            and hasattr(policy, "peft_config")
        )
        if peft:  # before the EMA is built: the frozen "ref" adapter is then not stored
            _add_reference_adapter(policy)
        super().on_train_begin(args, state, control, **kwargs)
        trainer, ema = self._trainer, self.ema
        if trainer is None or ema is None:
            return
        if peft:
            self._pairs = _adapter_pairs(policy, ema)
            self._sync()
            return
        ref_model = getattr(trainer, "ref_model", None)
        if ref_model is None:
            raise ValueError(
                "ReferenceCallback: the trainer has no ref_model to keep (a trainer without a "
                "reference, or precompute_ref_log_probs=True): pass ref_model= to the trainer"
            )
        if state.global_step == 0:  # the reference starts as the ref_model given (TR-DPO)
            _start_from(ema, ref_model)
        if self.tr_dpo:
            trainer.ref_model = ema.get_module()  # the average itself: no second copy
        else:
            self._reference = ref_model
            self._sync()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_step_end(args, state, control, **kwargs)  # the update, when due
        if self.ema is not None and state.global_step % self.sync_steps == 0:
            self._sync()

    def _sync(self) -> None:
        """The reference takes the average (TR-DPO without PEFT: it is the average already)."""
        ema = self.ema
        assert ema is not None
        if self._pairs:
            values = ema.averaged_state_dict() if self._corrected else ema.averaged_tensors()
            with torch.no_grad():
                for target, name in self._pairs:
                    target.copy_(values[name])
        elif self._reference is not None:
            ema.copy_to(self._reference)


def _start_from(ema: Any, ref_model: torch.nn.Module) -> None:
    """Load ``ref_model``'s weights into the average (all or nothing, names checked)."""
    state = ema.state_dict()
    theirs = {**dict(ref_model.named_parameters()), **dict(ref_model.named_buffers())}
    for name, table in state["averages"].items():
        missing = [k for k in table if k not in theirs]
        if missing:
            raise ValueError(
                f"ReferenceCallback: the trainer's ref_model has no tensors {missing[:5]} of the "
                "policy: the reference must have the policy's architecture"
            )
        state["averages"][name] = {k: theirs[k].detach() for k in table}
    ema.load_state_dict(state)


def _add_reference_adapter(model: Any) -> None:
    """Add the adapter ``"ref"`` (a copy of the active adapter's configuration), frozen, to a
    PEFT ``model`` unless it has one; the trained adapter stays the active one."""
    if REFERENCE_ADAPTER not in model.peft_config:
        model.add_adapter(REFERENCE_ADAPTER, model.peft_config[model.active_adapter])
    for n, p in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in n:
            p.requires_grad_(False)


def _adapter_pairs(model: Any, ema: Any) -> list[tuple[torch.Tensor, str]]:
    """``(tensor of the "ref" adapter, the name of the active adapter's average)``."""
    active = model.active_adapter
    params = dict(model.named_parameters())
    pairs = []
    for name in ema.averaged_tensors():
        target = name.replace(f".{active}.", f".{REFERENCE_ADAPTER}.")
        if target != name and target in params:
            pairs.append((params[target].detach(), name))
    if not pairs:
        raise ValueError(
            f"ReferenceCallback: the PEFT model's adapter {active!r} has no tensors averaged "
            "(is it trainable?): nothing to keep as the reference adapter"
        )
    return pairs
