"""What a reconstruction returns: one average (:class:`Reconstruction`), and several keyed by
their target (:class:`Reconstructions`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from polyak.posthoc.profiles import Solution, Target

__all__ = ["Reconstruction", "Reconstructions"]


class Reconstruction(dict):
    """``{tensor name: tensor}`` of a reconstructed average, and how it was obtained.

    It holds every tensor the store's manifest lists (a snapshot file lacking one is a
    :class:`~polyak.posthoc.StoreError`, never a shorter result), under canonical names (no
    ``module.`` prefixes): load it with ``model.load_state_dict(rec)``, with ``strict=False``
    only when the EMA tracked a subset of the model (``include``/``exclude``), or save it with
    ``safetensors.torch.save_file(rec, path)``. Averaged tensors are float32 (``dtype``); copied
    tensors (integer buffers, ``buffers="copy"``) come from the latest snapshot used.

    Attributes:
        label: ``"sigma_rel=0.08"``, ``"decay=0.9995"`` or ``"window=4"``.
        step: the optimizer step reconstructed.
        solution: the :class:`~polyak.posthoc.profiles.Solution` (coefficients, ``fit``,
            ``amplification``), ``None`` for a window average.
        sources: ``(step, average key)`` of each snapshot file combined, in coefficient order.
        coefficients: the weight of each source (they sum to 1).
        rank: the rank whose shards these are (``None``: full tensors).
        run_id: the run that wrote the store.
        shards: for a rank's shards, ``{name: {"global_shape", "offset", "local_shape"}}``.
    """

    label: str
    step: int
    solution: Solution | None
    sources: list[tuple[int, str]]
    coefficients: np.ndarray
    rank: int | None
    run_id: str
    shards: dict[str, Any] | None

    @property
    def fit(self) -> float | None:
        """Relative L2 distance between the achieved and the target weight profile."""
        return None if self.solution is None else self.solution.fit


class Reconstructions(Mapping[str, Reconstruction]):
    """The averages of :func:`~polyak.posthoc.reconstruct_many`, keyed by their target.

    Keys are the targets' labels (``"sigma_rel=0.08"``, ``"decay=0.9995"``; a ``gamma`` target
    is labelled by its ``sigma_rel``), in the order the targets were given (sigma_rels, then
    gammas, then decays). A number looks up a ``sigma_rel`` (``recs[0.08]``), and a
    :class:`~polyak.posthoc.Target` its own label.

    Examples:
        >>> import tempfile, torch, polyak
        >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
        >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10)
        >>> for step in range(100):
        ...     ph.update()
        >>> ph.close()
        >>> recs = polyak.posthoc.reconstruct_many(store, [0.05, 0.1], decays=[0.97])
        >>> list(recs)
        ['sigma_rel=0.05', 'sigma_rel=0.1', 'decay=0.97']
        >>> recs[0.1] is recs["sigma_rel=0.1"], recs["decay=0.97"].step
        (True, 100)
    """

    def __init__(self, recs: Iterable[Reconstruction]) -> None:
        self._recs: dict[str, Reconstruction] = {}
        for rec in recs:
            if rec.label in self._recs:
                raise ValueError(f"the target {rec.label} is given twice; give each once")
            self._recs[rec.label] = rec

    @staticmethod
    def _label(key: object) -> object:
        if isinstance(key, Target):
            return key.label
        if isinstance(key, (int, float, np.floating)) and not isinstance(key, bool):
            try:
                return Target.make(float(key)).label
            except ValueError:
                return key
        return key

    def __getitem__(self, key: object) -> Reconstruction:
        label = self._label(key)
        try:
            return self._recs[label]  # type: ignore[index]
        except (KeyError, TypeError):
            raise KeyError(
                f"no reconstruction of {key!r}; the targets are {list(self._recs)} (a number "
                "is looked up as a sigma_rel)"
            ) from None

    def __contains__(self, key: object) -> bool:
        label = self._label(key)
        return isinstance(label, str) and label in self._recs

    def __iter__(self) -> Iterator[str]:
        return iter(self._recs)

    def __len__(self) -> int:
        return len(self._recs)

    def __repr__(self) -> str:
        fits = ", ".join(f"{k!r}: fit {r.fit:.1e}" if r.fit is not None else repr(k)
                         for k, r in self._recs.items())  # fmt: skip
        return f"Reconstructions({{{fits}}})"
