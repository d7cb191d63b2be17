"""Greedy soups: average fine-tuned models, keeping each only if the soup scores no worse.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time" (ICML 2022), Recipe 1: score every ingredient alone, sort
them by score (best first), start the soup with the best, then add each next ingredient to the
soup (a uniform average) if the soup's score with it is at least the soup's score without it
(ties kept, as in the paper: a validation score over a finite set ties often, and an ingredient
that does not hurt adds robustness). The soup kept is written by :func:`polyak.merge.merge`
with uniform weights over the ingredients kept (its float32 rounding differs from the candidate
scored only in the order of the additions).

Memory: the running soup's sum and the candidate being scored, two float32 copies of the model
(a scorer needs a whole state dict); ingredients are read one tensor at a time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from polyak.merge._source import Source
from polyak.merge.sources import open_sources
from polyak.merge.stream import MergeResult, prepare

__all__ = ["ScoreError", "SoupResult", "greedy_soup", "scored"]

Scorer = Callable[[dict[str, torch.Tensor]], float]


class ScoreError(ValueError):
    """The scorer raised, or returned something other than a finite number."""


def scored(score: Callable[[dict[str, torch.Tensor]], object], state: dict[str, torch.Tensor],
           what: str) -> float:  # fmt: skip
    """``score(state)`` as a finite float, or :class:`ScoreError` naming ``what`` was scored.

    Examples:
        >>> scored(lambda sd: float(sd["w"].sum()), {"w": torch.ones(3)}, "the soup")
        3.0
    """
    name = getattr(score, "__qualname__", repr(score))
    try:
        value = score(state)
    except Exception as e:
        raise ScoreError(f"the scorer {name} raised {type(e).__name__} on {what}: {e}") from e
    number = math.nan
    if not isinstance(value, (bool, str, bytes)):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ScoreError(
            f"the scorer {name} returned {value!r:.60} for {what}; it must return a finite "
            "number (higher is better)"
        )
    return number


@dataclass(frozen=True)
class SoupResult:
    """What :func:`greedy_soup` chose and wrote.

    Attributes:
        scores: each ingredient's own score, ``{source name: score}``, in the order given.
        kept: the ingredients in the soup, in the order they were added (best first).
        soup_score: the score of the soup kept.
        trace: ``(ingredient, soup score with it, kept)`` for every ingredient tried after the
            first.
        merge: the :class:`~polyak.merge.MergeResult` of the soup written.
    """

    scores: dict[str, float]
    kept: list[str]
    soup_score: float
    trace: list[tuple[str, float, bool]]
    merge: MergeResult


def _state(sources: Sequence[Source], weight: float, base: Mapping[str, torch.Tensor] | None,
           buffer: bytearray) -> dict[str, torch.Tensor]:  # fmt: skip
    """``(base + sum of the sources) * weight`` for floating tensors (float32), integer tensors
    from the last source; ``base`` ``None`` is zero. Reads one tensor at a time."""
    out: dict[str, torch.Tensor] = {}
    last = sources[-1]
    for name, (dtype, shape) in last.tensors.items():
        n = math.prod(shape)
        if not dtype.is_floating_point:
            out[name] = last.read(name, 0, n, buffer).clone().reshape(shape)
            continue
        acc = (
            torch.zeros(n, dtype=torch.float32) if base is None else base[name].clone().reshape(-1)
        )
        for s in sources:
            acc.add_(s.read(name, 0, n, buffer))
        out[name] = acc.mul_(weight).reshape(shape)
    return out


def greedy_soup(
    sources: Sequence[str | Path],
    score: Scorer,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
) -> SoupResult:
    """The greedy soup of ``sources`` under ``score`` (higher is better), written to ``out``.

    Args:
        sources: the ingredients (paths of any kind :func:`~polyak.merge.open_sources` reads),
            typically fine-tuned runs from one pre-trained model. Integer tensors come from the
            last one given that the soup keeps.
        score: ``score(state_dict) -> float``, e.g. validation accuracy after
            ``model.load_state_dict(state_dict)``; it must not keep the tensors it is given.
        out: the output folder (Hugging Face layout, as :func:`~polyak.merge.merge`).
        dtype: the output's floating dtype (default: the latest ingredient's).

    Returns:
        :class:`SoupResult`.

    Raises:
        ScoreError: the scorer raised or returned a non-finite number (naming what it scored).

    Examples:
        >>> import tempfile, pathlib, torch
        >>> from safetensors.torch import save_file
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i, v in enumerate([1.0, 3.0, 2.5, 9.0]):
        ...     save_file({"w": torch.tensor([v])}, d / f"run{i}.safetensors")
        >>> near_two = lambda sd: -abs(float(sd["w"]) - 2.0)  # the best soup is close to 2
        >>> soup = greedy_soup(sorted(d.glob("run*.safetensors")), near_two, d / "soup")
        >>> [pathlib.Path(k).stem for k in soup.kept], round(soup.soup_score, 4)
        (['run2', 'run0', 'run1'], -0.1667)
    """
    opened = open_sources(list(sources))
    try:
        prepare(opened, [1.0] * len(opened), out, dtype)  # every check before the scoring
        widest = max(d.itemsize for s in opened for d, _ in s.tensors.values())
        buffer = bytearray(max(max(math.prod(sh) for _, sh in s.tensors.values()) for s in opened)
                           * widest)  # fmt: skip
        scores = {s.name: scored(score, _state([s], 1.0, None, buffer), s.name) for s in opened}
        order = sorted(range(len(opened)), key=lambda i: -scores[opened[i].name])
        soup = [order[0]]
        total = _state([opened[order[0]]], 1.0, None, buffer)
        best = scores[opened[order[0]].name]
        trace = []
        for i in order[1:]:
            members = sorted([*soup, i])
            candidate = _state([opened[j] for j in members if j == i], 1.0 / len(members),
                               total, buffer)  # fmt: skip
            _integers_from(candidate, opened[members[-1]], buffer)
            value = scored(score, candidate, f"the soup with {opened[i].name}")
            keep = value >= best
            trace.append((opened[i].name, value, keep))
            if keep:
                soup.append(i)
                best = value
                total = _state([opened[i]], 1.0, total, buffer)
            del candidate
        kept = [opened[i].name for i in soup]
        chosen = [opened[i] for i in sorted(soup)]
        result = prepare(chosen, [1.0] * len(chosen), out, dtype).run()
    finally:
        for s in opened:
            s.close()
    return SoupResult(scores, kept, best, trace, result)


def _integers_from(state: dict[str, torch.Tensor], source: Source, buffer: bytearray) -> None:
    for name, (dtype, shape) in source.tensors.items():
        if not dtype.is_floating_point:
            state[name] = source.read(name, 0, math.prod(shape), buffer).clone().reshape(shape)
