"""The committed ground truth: the measured gain of every group of a bundled dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from etap_torch.datasets._common import DATA_ROOT

GROUND_TRUTH_NAMES = ("chemical", "etth1")


@dataclass
class GroundTruth:
    """Gains and losses of every group of a dataset, measured by training each group.

    Attributes:
        name: the dataset.
        task_names: the ``T`` task names; task ``t`` is bit ``t`` of a group's bitmask.
        groups: ``[N, T]`` bool membership of every non-empty group (``N = 2^T - 1``), ordered
            by bitmask ascending; singles included.
        gains: ``[seeds, N, T]`` float64 ``gain(S, t)`` per seed, 0 off the membership and for
            singles.
        test_losses: ``[seeds, N, T]`` float64 test loss of every member, 0 off the membership.
        validation_losses: ``[seeds, N, T]`` float64 validation loss at the restored epoch.
        seeds: the training seeds.
        metadata: how the table was made: command, recipe, training seconds, machine and the
            noise ceiling (Pearson correlation of gains between seeds).
    """

    name: str
    task_names: list[str]
    groups: torch.Tensor
    gains: torch.Tensor
    test_losses: torch.Tensor
    validation_losses: torch.Tensor
    seeds: list[int]
    metadata: dict = field(default_factory=dict)

    @property
    def mean_gains(self) -> torch.Tensor:
        """``[N, T]`` gains averaged over seeds."""
        return self.gains.mean(dim=0)

    @property
    def noise_ceiling(self) -> dict:
        return self.metadata.get("noise_ceiling", {})

    @property
    def command(self) -> str:
        return self.metadata.get("command", "")

    @property
    def cost_seconds(self) -> float:
        """Seconds of training that produced the table (all seeds)."""
        return float(self.metadata.get("training_seconds", float("nan")))


def load_ground_truth(name: str, root: str | Path | None = None) -> GroundTruth:
    """Load the committed gain table of ``"chemical"`` (1,023 groups) or ``"etth1"`` (127).

    Args:
        name: the dataset.
        root: folder holding ``{name}.npz``; the bundled tables by default.
    """
    if name not in GROUND_TRUTH_NAMES:
        raise ValueError(
            f"Parameter `name` should be one of {list(GROUND_TRUTH_NAMES)}. Found {name!r}."
        )
    folder = Path(root) if root is not None else DATA_ROOT / "ground_truth"
    path = folder / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(
            f"Parameter `root` should be a folder holding {name}.npz. Found no file {path}."
        )
    with np.load(path) as table:
        return GroundTruth(
            name=name,
            task_names=[str(task) for task in table["task_names"]],
            groups=torch.from_numpy(table["groups"].astype(bool)),
            gains=torch.from_numpy(table["gains"].astype(np.float64)),
            test_losses=torch.from_numpy(table["test_losses"].astype(np.float64)),
            validation_losses=torch.from_numpy(table["validation_losses"].astype(np.float64)),
            seeds=[int(seed) for seed in table["seeds"]],
            metadata=json.loads(str(table["metadata"])),
        )
