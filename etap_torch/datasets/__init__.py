"""The bundled real datasets and their ground-truth gain tables."""

from etap_torch.datasets._common import MultiTaskData, Split, TaskData
from etap_torch.datasets.chemical import CHEMICAL_TASKS, load_chemical
from etap_torch.datasets.ett import ETTH1_TASKS, load_etth1

__all__ = [
    "CHEMICAL_TASKS",
    "ETTH1_TASKS",
    "MultiTaskData",
    "Split",
    "TaskData",
    "load_chemical",
    "load_etth1",
]
