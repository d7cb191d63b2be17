"""Post-hoc EMA (EDM2): keep snapshots of power averages, choose the horizon after training.

Karras et al. ("Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024,
Sec. 3) keep two power-function averages during training (``sigma_rel`` 0.05 and 0.10), store
snapshots of both every so often, and afterwards reconstruct the average of *any* ``sigma_rel``
as the least-squares combination of the snapshots whose weight profile over training time is
closest to the target's.

Example:
    >>> import tempfile, torch, polyak
    >>> model, store = torch.nn.Linear(3, 2), tempfile.mkdtemp()
    >>> ph = polyak.PostHocEMA(model, store, snapshot_every=10)
    >>> for step in range(100):  # after each optimizer step
    ...     ph.update()
    >>> ph.close()  # waits for the last write
    >>> avg = polyak.posthoc.reconstruct(store, sigma_rel=0.08)  # {name: float32 tensor}
    >>> sorted(avg), avg.step
    (['bias', 'weight'], 100)
    >>> many = polyak.posthoc.reconstruct_many(store, [0.05, 0.1, 0.2])
    >>> many[0.1].fit < 0.01  # keyed by target; a number is a sigma_rel
    True

Needs torch and safetensors (``pip install polyak[torch]``).
"""

from polyak.posthoc.ema import PostHocEMA
from polyak.posthoc.errors import ChecksumError, ForeignRunError, StoreError
from polyak.posthoc.overview import Listing, WeightProfile, list_snapshots, weight_profiles
from polyak.posthoc.profiles import Solution, Target, solve
from polyak.posthoc.reconstruct import reconstruct, reconstruct_many, window_average
from polyak.posthoc.results import Reconstruction, Reconstructions
from polyak.posthoc.writer import Retention, SnapshotWriteError

__all__ = [
    "ChecksumError",
    "ForeignRunError",
    "Listing",
    "PostHocEMA",
    "Reconstruction",
    "Reconstructions",
    "Retention",
    "SnapshotWriteError",
    "Solution",
    "StoreError",
    "Target",
    "WeightProfile",
    "list_snapshots",
    "reconstruct",
    "reconstruct_many",
    "solve",
    "weight_profiles",
    "window_average",
]
