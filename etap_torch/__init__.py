"""etap-torch: measure task affinity in one training run, predict the gain of every
task group, and choose the best grouping.

The public names are re-exported here; see README.md for a tour.
"""

from etap_torch import datasets
from etap_torch._ext import built_with_cuda
from etap_torch.gains import GainTable, collect_gains, gains_from_losses
from etap_torch.tracker import AffinityTracker

__all__ = [
    "AffinityTracker",
    "GainTable",
    "built_with_cuda",
    "collect_gains",
    "datasets",
    "gains_from_losses",
]
__version__ = "0.1.0"
