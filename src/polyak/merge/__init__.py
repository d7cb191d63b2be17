"""Weighted averages of saved checkpoints, streamed in bounded memory (``polyak merge``).

Averaging no longer happens only during training: LAWA averages a run's last checkpoints, WSM
merges the checkpoints of a constant-learning-rate run instead of decaying the rate, model soups
average fine-tuned runs. :func:`merge` computes ``sum_i w_i theta_i`` over checkpoints of any
kind (:func:`open_sources`), one span of one tensor at a time, and writes it in the Hugging Face
layout; :mod:`polyak.merge.weights` gives weights that mean something (LAWA, an EMA, a power
average, a learning-rate decay); :func:`greedy_soup` chooses the ingredients by a score.

Example:
    >>> import tempfile, pathlib, torch
    >>> from safetensors.torch import save_file, load_file
    >>> from polyak.merge import merge, weights
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> steps = [100, 200, 300, 400]
    >>> for s in steps:  # a run's checkpoints (here the weight is just the step)
    ...     save_file({"w": torch.tensor([float(s)])}, d / f"step{s}.safetensors")
    >>> w = weights.lawa(steps, k=2)  # the mean of the last two
    >>> result = merge([d / f"step{s}.safetensors" for s in steps], w, d / "lawa")
    >>> load_file(d / "lawa" / "model.safetensors")["w"]
    tensor([350.])

Needs torch and safetensors (``pip install polyak[torch]``).
"""

from polyak.merge import weights
from polyak.merge._source import Source
from polyak.merge.soup import ScoreError, SoupResult, greedy_soup
from polyak.merge.sources import open_sources
from polyak.merge.stream import MergePlan, MergeResult, merge, prepare
from polyak.merge.weights import Weights

__all__ = [
    "MergePlan",
    "MergeResult",
    "ScoreError",
    "SoupResult",
    "Source",
    "Weights",
    "greedy_soup",
    "merge",
    "open_sources",
    "prepare",
    "weights",
]
