"""etap-torch: measure task affinity in one training run, predict the gain of every
task group, and choose the best grouping.

The public names are re-exported here; see README.md for a tour.
"""

from etap_torch._ext import built_with_cuda
from etap_torch.ensemble import EnsemblePredictor, group_affinity
from etap_torch.metrics import PredictionQuality, prediction_quality

__all__ = [
    "EnsemblePredictor",
    "PredictionQuality",
    "built_with_cuda",
    "group_affinity",
    "prediction_quality",
]
__version__ = "0.1.0"
