"""Training workflows around :class:`polyak.EMA` (imports torch).

* :func:`train_with_ema` — a training loop that keeps averages and evaluates live vs averaged
  weights every epoch;
* :func:`evaluate` — the size-weighted mean loss (and metrics) of a model over a loader;
* :class:`EarlyStopping` — the best epoch over the live weights and every average;
* :func:`recompute_bn` — BatchNorm statistics recomputed for averaged weights;
* :func:`soft_update_`, :func:`hard_update_` — target networks (RL, BYOL, MoCo, mean teacher);
* :class:`TargetEMA` — an EMA kept in a second model (teacher, target network, TR-DPO reference),
  on a schedule, resumable; shard by shard under FSDP2 and ZeRO-3;
* :func:`ensemble_predictions` — the mean predicted probabilities of several checkpoints;
* :class:`WriteBack` — when to copy an average into the trained model (Switch EMA, PMA);
* :func:`swag_predictions` — sample models from a :class:`polyak.SWAG`, recompute BatchNorm,
  ensemble their predictions.

Batches follow one convention everywhere: a tensor is an input without target, a tuple or list
``(x, y)`` is inputs then target (``(x1, x2, y)`` passes ``x1, x2``; ``(x,)`` has no target), a
dict is keyword inputs without target. For anything else pass ``forward(model, batch) ->
(outputs, targets)``; it receives the batch already moved to the device.
"""

from polyak.workflows.bn import recompute_bn
from polyak.workflows.early_stopping import Best, EarlyStopping
from polyak.workflows.ensemble import EnsemblePredictions, ensemble_predictions
from polyak.workflows.evaluate import evaluate
from polyak.workflows.swag import swag_predictions
from polyak.workflows.target import hard_update_, soft_update_
from polyak.workflows.target_ema import TargetEMA
from polyak.workflows.train import train_with_ema
from polyak.workflows.write_back import WriteBack

__all__ = [
    "Best",
    "EarlyStopping",
    "EnsemblePredictions",
    "TargetEMA",
    "WriteBack",
    "ensemble_predictions",
    "evaluate",
    "hard_update_",
    "recompute_bn",
    "soft_update_",
    "swag_predictions",
    "train_with_ema",
]
