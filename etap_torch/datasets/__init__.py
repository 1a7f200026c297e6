"""The bundled real datasets and their ground-truth gain tables."""

from etap_torch.datasets._common import MultiTaskData, Split, TaskData
from etap_torch.datasets.chemical import CHEMICAL_TASKS, load_chemical
from etap_torch.datasets.ett import ETTH1_TASKS, load_etth1
from etap_torch.datasets.ground_truth import GroundTruth, load_ground_truth

__all__ = [
    "CHEMICAL_TASKS",
    "ETTH1_TASKS",
    "GroundTruth",
    "MultiTaskData",
    "Split",
    "TaskData",
    "load_chemical",
    "load_etth1",
    "load_ground_truth",
]
