"""``polyak.SWAG``: a Gaussian over a model's weights from its trajectory (Maddox et al. 2019).

The moments live in the flat storage of :class:`polyak.EMA` (:mod:`polyak._torch.storage`): one
``(K + 2, N)`` buffer per device and dtype, row 0 the mean, row 1 the centred second moment,
rows ``2 .. K + 1`` the deviation columns, each tensor a view of its row. A collection is then
four kernels per buffer over contiguous rows, and under FSDP2 each rank keeps the moments of
its own shards (everything is elementwise except the draw of the ``K`` low-rank coefficients,
which every rank draws alike).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from polyak._state import check_header
from polyak._torch.binding import Policy, select
from polyak._torch.naming import Entry, unmaterialized, unwrap
from polyak._torch.sharding import ShardInfo, shard_info, take_shard
from polyak._torch.state import _match
from polyak._torch.storage import FlatStorage

__all__ = ["SWAG"]

_FORMAT, _VERSION = "polyak.SWAG", 1
_COVARIANCE = ("low-rank", "diagonal")


def _int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
    return value


def _trained(e: Entry) -> bool:
    """A floating parameter that requires grad (a frozen one's Gaussian is a point mass)."""
    return e.is_param and e.mode == "average" and e.raw().requires_grad


class SWAG:
    """SWA-Gaussian: the mean, the diagonal variance and a low-rank covariance of the weights
    along training, and samples of that Gaussian put into a model.

    Every ``update_every`` optimizer steps after ``start_step`` :meth:`update` collects the live
    weights ``theta`` (the ``n + 1``-th model) in one pass:

        mean_{n+1} = mean_n + (theta - mean_n) / (n + 1)                  (the SWA average)
        M2_{n+1}   = M2_n + (theta - mean_n) (theta - mean_{n+1})         (Welford)
        D[n mod K] = theta - mean_{n+1}                                   (deviation column)

    so ``Sigma_diag = M2 / n`` (Maddox's ``sq_mean - mean^2``, computed without its
    cancellation) and ``D`` holds the last ``K`` deviations. :meth:`sample` draws

        low-rank:  theta~ = mean + sqrt(scale) (Sigma_diag^1/2 z1 / sqrt 2 + D z2 / sqrt(2 (K-1)))
        diagonal:  theta~ = mean + sqrt(scale) Sigma_diag^1/2 z1

    with ``z1 ~ N(0, I_d)``, ``z2 ~ N(0, I_K)``: the covariance ``scale * (Sigma_diag +
    D D^T / (K - 1)) / 2`` of the paper (Sec. 3-4), ``scale=0.5`` its experiments' value.

    Memory: ``K + 2`` copies of the tracked parameters (float32 by default). Buffers
    (BatchNorm statistics) are not tracked: recompute them for each sample
    (:func:`polyak.workflows.swag_predictions` does). Parameters only, floating ones that
    require grad when SWAG is built: a frozen one (a LoRA model's base) never moves, so its
    Gaussian is a point mass; it is not stored and :meth:`sample` leaves it as the model has it.

    Args:
        model: the model being trained (possibly wrapped by DDP or ``torch.compile``).
        rank: ``K >= 1``, the deviation columns kept (Maddox et al. use 20).
        start_step: collect only at optimizer steps after this one (SWAG starts late in training,
            from a pretrained solution or at a high constant learning rate).
        update_every: collect every this many optimizer steps (Maddox et al.: once per epoch).
        include: glob pattern(s) over canonical parameter names: only these are tracked.
        exclude: glob pattern(s) of parameters not to track.
        dtype: dtype of the moments (float32 at least is advised).

    Examples:
        >>> import torch, polyak
        >>> model = torch.nn.Linear(4, 2)
        >>> swag = polyak.SWAG(model, rank=3)
        >>> for _ in range(5):
        ...     with torch.no_grad():
        ...         _ = model.weight.add_(torch.randn(2, 4))
        ...     swag.update()
        >>> swag.collected, len(swag.deviations())
        (5, 3)
        >>> swag.sample(model, generator=torch.Generator().manual_seed(0))  # into the model

    References:
        Maddox, Izmailov, Garipov, Vetrov & Wilson, "A Simple Baseline for Bayesian Uncertainty
        in Deep Learning", NeurIPS 2019 (their ``swag/posteriors/swag.py``); Izmailov et al.,
        UAI 2018 (SWA).
    """

    def __init__(
        self,
        model: nn.Module,
        rank: int = 20,
        *,
        start_step: int = 0,
        update_every: int = 1,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.rank = _int(rank, "rank", 1)
        self.start_step = _int(start_step, "start_step", 0)
        self.update_every = _int(update_every, "update_every", 1)
        self._policy = Policy(
            "ignore", include, exclude, dtype, None, False, False, None, "", "average"
        )
        self._model = model
        entries = [e for e in select(model, self._policy).entries if _trained(e)]
        for e in entries:
            why = unmaterialized(e.name, e.get())
            if why is not None:
                raise ValueError(why)
        if not entries:
            raise ValueError(
                "the model has no floating parameter that requires grad for SWAG to track"
            )
        self._entries = entries
        self._names = [e.name for e in entries]
        specs = [
            (e.name, e.get().shape, self._policy.average_dtype(e.get()), e.get().device)
            for e in entries
        ]
        self._storage = FlatStorage(specs, rows=self.rank + 2)
        shards = {e.name: shard_info(e.raw()) for e in entries}
        zero3 = [
            n for n, info in shards.items() if info is not None and not isinstance(info, ShardInfo)
        ]
        if zero3:  # untested there: refused by name rather than averaged wrong
            raise TypeError(
                f"SWAG does not support DeepSpeed ZeRO-3 partitions ({zero3[:3]}); "
                "keep SWAG on a ZeRO-1/2 or FSDP2 model"
            )
        self._shards = {n: info for n, info in shards.items() if isinstance(info, ShardInfo)}
        self.step = 0
        self._last = self.start_step
        self.collected = 0

    # ----------------------------------------------------------------- collecting
    def _lives(self, model: nn.Module | None) -> list[torch.Tensor]:
        if model is None or unwrap(model) is unwrap(self._model):
            return [e.get() for e in self._entries]
        _, entries, lives, _ = select(model, self._policy)
        theirs = {e.name: t for e, t in zip(entries, lives)}
        missing = [n for n in self._names if n not in theirs]
        if missing:
            raise ValueError(f"the model passed has no parameter {missing[:5]}, which SWAG keeps")
        for e in self._entries:
            if theirs[e.name].shape != self._storage.slots[e.name].shape:
                raise ValueError(
                    f"{e.name}: the model has shape {tuple(theirs[e.name].shape)}, SWAG keeps "
                    f"{tuple(self._storage.slots[e.name].shape)}"
                )
        return [theirs[n] for n in self._names]

    @torch.no_grad()
    def update(self, model: nn.Module | None = None, *, steps: int = 1) -> None:
        """Account for ``steps`` optimizer steps; collect the weights when due.

        Call it after each ``optimizer.step()``, like :meth:`polyak.EMA.update`.
        """
        steps = _int(steps, "steps", 1)
        t = self.step + steps
        if t <= self.start_step or t - self._last < self.update_every:
            self.step = t
            return
        lives = self._lives(model)
        n, slot = self.collected, 2 + self.collected % self.rank
        views = self._storage.views[slot]
        torch._foreach_copy_([views[n] for n in self._names], lives)  # the one read of the live
        for buf in self._storage.buffers.values():
            mean, second, column = buf[0], buf[1], buf[slot]
            mean.lerp_(column, 1.0 / (n + 1))
            column.sub_(mean)  # theta - mean_{n+1}
            if n:  # (theta - mean_n) = (theta - mean_{n+1}) (n + 1) / n
                second.addcmul_(column, column, value=(n + 1) / n)
        self.step, self._last, self.collected = t, t, n + 1

    # ----------------------------------------------------------------- reading
    @property
    def names(self) -> list[str]:
        """Canonical names of the tracked parameters."""
        return list(self._names)

    @property
    def nbytes(self) -> int:
        """Memory of the moments: ``K + 2`` copies of the tracked parameters."""
        return self._storage.nbytes

    def moments(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"mean": {...}, "variance": {...}}``: the SWA mean (views) and the diagonal
        variance ``M2 / n`` (new tensors), per parameter name."""
        n = max(self.collected, 1)
        return {
            "mean": dict(self._storage.views[0]),
            "variance": {k: v / n for k, v in self._storage.views[1].items()},
        }

    def deviations(self) -> list[dict[str, torch.Tensor]]:
        """The filled deviation columns ``theta_i - mean_i`` (views), oldest first."""
        k = min(self.collected, self.rank)
        order = [(self.collected - k + i) % self.rank for i in range(k)]
        return [dict(self._storage.views[2 + c]) for c in order]

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module | None = None,
        *,
        scale: float = 0.5,
        covariance: Literal["low-rank", "diagonal"] = "low-rank",
        generator: torch.Generator | None = None,
    ) -> None:
        """Write a draw of the Gaussian into ``model``'s parameters (default: the trained one).

        ``scale=0`` writes the SWA mean. The draw is a function of ``generator`` only (a CPU
        generator): the same on every rank under DDP, and under FSDP2 each rank writes its
        shard of the draw a single process would make. All or nothing: the sample is made in
        full before the first parameter is written. Buffers are left alone.

        Raises:
            ValueError: nothing collected yet; ``low-rank`` with fewer than 2 collected
                models; a bad ``scale`` or ``covariance``.
        """
        if covariance not in _COVARIANCE:
            raise ValueError(f"covariance must be one of {_COVARIANCE}, got {covariance!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"scale must be a number >= 0, got {scale!r}")
        need = 2 if covariance == "low-rank" and scale > 0 else 1
        if self.collected < need:
            raise ValueError(
                f"SWAG has collected {self.collected} models; sampling with covariance="
                f"{covariance!r} needs {need} (update() after start_step={self.start_step})"
            )
        targets = self._targets(model)
        out = FlatStorage(self._storage.specs, rows=1)
        views = out.views[0]
        k = min(self.collected, self.rank)
        z2 = torch.randn(k, generator=generator, dtype=torch.float64)
        root = math.sqrt(scale)
        mean, second = self._storage.views[0], self._storage.views[1]
        for name in self._names:
            v = views[name]
            info = self._shards.get(name)
            shape = info.global_shape if info else tuple(v.shape)
            z1 = torch.randn(shape, generator=generator, dtype=torch.float32)
            if info is not None:
                z1 = take_shard(z1, info)
            std = (second[name] / self.collected).clamp_min(0).sqrt()
            if covariance == "diagonal":
                v.copy_(mean[name] + root * std * z1.to(v.device, v.dtype))
                continue
            v.copy_(std * z1.to(v.device, v.dtype))
            v.mul_(1 / math.sqrt(2))
        if covariance == "low-rank":
            columns = self.deviations()
            factor = root / math.sqrt(2 * (k - 1))
            for name in self._names:
                v = views[name]
                v.mul_(root)
                for c, w in zip(columns, z2.tolist()):
                    v.add_(c[name], alpha=factor * w)
                v.add_(mean[name])
        staged = [views[n].to(t.device, t.dtype) for n, t in zip(self._names, targets)]
        for t, s in zip(targets, staged):
            t.copy_(s)

    def _targets(self, model: nn.Module | None) -> list[torch.Tensor]:
        return self._lives(model)

    # ----------------------------------------------------------------- saving and loading
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: counters and the moments (views: save or clone them)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "rank": self.rank,
            "step": self.step,
            "last_collect_step": self._last,
            "collected": self.collected,
            "start_step": self.start_step,
            "update_every": self.update_every,
            "rows": [dict(v) for v in self._storage.views],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output, read as untrusted: every field and tensor is checked
        (names, shapes, dtypes, finiteness, consistent counters) and every copy made before
        anything changes.

        Raises:
            TypeError, ValueError, polyak.NonFiniteError: naming the field or tensor at fault.
        """
        state = check_header(
            state, _FORMAT, _VERSION, ("rank", "step", "last_collect_step", "collected", "rows")
        )
        rank = _int(state["rank"], "rank", 1)
        if rank != self.rank:
            raise ValueError(f"the state was saved with rank={rank}, this SWAG has {self.rank}")
        step = _int(state["step"], "step", 0)
        last = _int(state["last_collect_step"], "last_collect_step", 0)
        collected = _int(state["collected"], "collected", 0)
        if last > step or collected > step:
            raise ValueError(
                f"inconsistent SWAG state: step={step}, last_collect_step={last}, "
                f"collected={collected}"
            )
        rows = state["rows"]
        if not isinstance(rows, (list, tuple)) or len(rows) != self.rank + 2:
            raise ValueError(f"'rows' must be a list of {self.rank + 2} tables of tensors")
        pairs = []
        for i, (ours, saved) in enumerate(zip(self._storage.views, rows)):
            pairs += _match(ours, saved, self._shards, {}, f"SWAG row {i}")
        with torch.no_grad():
            staged = [(dst, src.to(dst.device, dst.dtype)) for dst, src in pairs]
            for dst, src in staged:
                dst.copy_(src)
        self.step, self._last, self.collected = step, last, collected

    def __repr__(self) -> str:
        return (
            f"SWAG(rank={self.rank}, tensors={len(self._names)}, collected={self.collected}, "
            f"step={self.step}, {self.nbytes / 2**20:.1f} MiB)"
        )
