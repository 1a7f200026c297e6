"""etap-torch: measure task affinity in one training run, predict the gain of every
task group, and choose the best grouping.

The public names are re-exported here; see README.md for a tour.
"""

from etap_torch import ops
from etap_torch._ext import built_with_cuda
from etap_torch.lookahead import exact_lookahead
from etap_torch.ops import affinity, affinity_adam, affinity_sgd
from etap_torch.tracker import AffinityTracker

__all__ = [
    "AffinityTracker",
    "affinity",
    "affinity_adam",
    "affinity_sgd",
    "built_with_cuda",
    "exact_lookahead",
    "ops",
]
__version__ = "0.1.0"
