"""Containers shared by the dataset loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

DATA_ROOT = Path(__file__).resolve().parent.parent / "data"


@dataclass
class Split:
    """One split of one task.

    Attributes:
        inputs: ``[n, features]`` model inputs.
        targets: ``[n]`` binary labels (float, 0/1) for classification or ``[n, horizon]``
            future values for forecasting.
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


@dataclass
class TaskData:
    """The train / validation / test splits of one task."""

    name: str
    train: Split
    validation: Split
    test: Split


@dataclass
class MultiTaskData:
    """Every task of a dataset, in the dataset's fixed task order.

    Attributes:
        name: ``"chemical"`` or ``"etth1"``.
        tasks: one :class:`TaskData` per task; task ``t`` is bit ``t`` of a group's bitmask.
        info: loader settings and derived statistics (for example the standardisation).
    """

    name: str
    tasks: list[TaskData]
    info: dict = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> TaskData:
        return self.tasks[index]

    def __len__(self) -> int:
        return len(self.tasks)
