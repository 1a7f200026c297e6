"""etap-torch: measure task affinity in one training run, predict the gain of every
task group, and choose the best grouping.

The public names are re-exported here; see README.md for a tour.
"""

from etap_torch import ops
from etap_torch._ext import built_with_cuda
from etap_torch.ops import affinity, affinity_adam, affinity_sgd

__all__ = ["affinity", "affinity_adam", "affinity_sgd", "built_with_cuda", "ops"]
__version__ = "0.1.0"
