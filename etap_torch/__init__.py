"""etap-torch: measure task affinity in one training run, predict the gain of every
task group, and choose the best grouping.

The public names are re-exported here; see README.md for a tour.
"""

from etap_torch import datasets, ops
from etap_torch._ext import built_with_cuda
from etap_torch.ensemble import EnsemblePredictor, group_affinity
from etap_torch.gains import GainTable, collect_gains, gains_from_losses
from etap_torch.grouping import SelectionResult, all_groups, select_from_predictor, select_groups
from etap_torch.lookahead import exact_lookahead
from etap_torch.metrics import PredictionQuality, prediction_quality
from etap_torch.ops import affinity, affinity_adam, affinity_sgd
from etap_torch.tracker import AffinityTracker

__all__ = [
    "AffinityTracker",
    "EnsemblePredictor",
    "GainTable",
    "PredictionQuality",
    "SelectionResult",
    "affinity",
    "affinity_adam",
    "affinity_sgd",
    "all_groups",
    "built_with_cuda",
    "collect_gains",
    "datasets",
    "exact_lookahead",
    "gains_from_losses",
    "group_affinity",
    "ops",
    "prediction_quality",
    "select_from_predictor",
    "select_groups",
]
__version__ = "0.1.0"
