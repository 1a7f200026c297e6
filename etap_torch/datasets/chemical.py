"""The chemical dataset: 10 binary molecular property tasks over 180 binary features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from etap_torch.datasets._common import DATA_ROOT, MultiTaskData, Split, TaskData

CHEMICAL_TASKS: tuple[str, ...] = ("83", "78", "84", "85", "76", "86", "81", "80", "87", "55")


def stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices so that each class keeps its share in the held-out part.

    Args:
        labels: ``[n]`` integer class labels.
        fraction: share of each class held out, in ``(0, 1)``.
        rng: source of the random permutation.

    Returns:
        ``(kept, held_out)``: sorted index arrays that partition ``range(n)``; the held-out part
        has ``round(fraction * n_c)`` samples of each class ``c``.
    """
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = round(fraction * members.size)
        held_out.append(rng.permutation(members)[:count])
    held_out_index = np.sort(np.concatenate(held_out))
    kept_index = np.setdiff1d(np.arange(labels.size), held_out_index)
    return kept_index, held_out_index


def load_chemical(
    root: str | Path | None = None,
    *,
    validation_fraction: float = 0.1,
    split_seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> MultiTaskData:
    """Load the 10 chemical tasks with a stratified validation split.

    Each task has its own molecules. The given train file of every task is split into train
    and validation, holding out ``validation_fraction`` of each class (stratified) with a
    generator seeded by ``split_seed`` and the task's position; the given test file is the test
    split. Task order: 83, 78, 84, 85, 76, 86, 81, 80, 87, 55.

    Args:
        root: folder with ``{ID}_X_train.npy`` etc.; the bundled copy by default.
        validation_fraction: share of each task's training data held out, in ``(0, 1)``.
        split_seed: seed of the validation split.
        dtype: floating dtype of inputs and targets.

    Returns:
        :class:`MultiTaskData` whose splits hold inputs ``[n, 180]`` (0/1 features) and
        targets ``[n]`` (0/1 labels as ``dtype``).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"Parameter `validation_fraction` should be in (0, 1). Found {validation_fraction}."
        )
    folder = Path(root) if root is not None else DATA_ROOT / "chemical"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Parameter `root` should be a folder with the chemical .npy files. Found {folder}."
        )

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)

    tasks = []
    for position, name in enumerate(CHEMICAL_TASKS):
        train_inputs = np.load(folder / f"{name}_X_train.npy")
        train_labels = np.load(folder / f"{name}_y_train.npy")
        test_inputs = np.load(folder / f"{name}_X_test.npy")
        test_labels = np.load(folder / f"{name}_y_test.npy")
        rng = np.random.default_rng([split_seed, position])
        kept, held_out = stratified_split(train_labels, validation_fraction, rng)
        tasks.append(
            TaskData(
                name=name,
                train=Split(tensor(train_inputs[kept]), tensor(train_labels[kept])),
                validation=Split(tensor(train_inputs[held_out]), tensor(train_labels[held_out])),
                test=Split(tensor(test_inputs), tensor(test_labels)),
            )
        )
    info = {"validation_fraction": validation_fraction, "split_seed": split_seed}
    return MultiTaskData("chemical", tasks, info)
