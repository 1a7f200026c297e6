"""etap-torch: measure task affinity in one training run, predict the gain of every
task group, and choose the best grouping.

The public names are re-exported here; see README.md for a tour.
"""

from etap_torch._ext import built_with_cuda
from etap_torch.grouping import (
    SelectionResult,
    all_groups,
    select_from_predictor,
    select_groups,
)

__all__ = [
    "SelectionResult",
    "all_groups",
    "built_with_cuda",
    "select_from_predictor",
    "select_groups",
]
__version__ = "0.1.0"
