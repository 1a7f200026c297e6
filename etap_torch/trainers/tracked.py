"""Train every task of a bundled dataset together while measuring task affinity."""

from __future__ import annotations

from collections.abc import Callable

import torch

from etap_torch.trainers.recipe import Recipe
from etap_torch.trainers.recipes import load_dataset, recipe_for
from etap_torch.trainers.single import SharedTrunkModel, train_group


def train_all_with_affinity(
    name: str = "chemical",
    *,
    seed: int = 0,
    every: int = 1,
    recipe: Recipe | None = None,
    on_batch: Callable[
        [SharedTrunkModel, Callable[[], list[torch.Tensor]], torch.optim.Optimizer], None
    ]
    | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train the all-tasks model of a bundled dataset with an :class:`AffinityTracker`.

    This is the one ordinary training run of ETAP: the model of every task together, with the
    tracker measuring the first-order lookahead affinity every ``every`` steps.

    Args:
        name: ``"chemical"`` or ``"etth1"``.
        seed: initial parameters and minibatch order (as in the ground truth).
        every: the tracker scores one optimizer step in ``every``.
        recipe: training settings; the dataset's recipe by default.
        on_batch: forwarded to :func:`etap_torch.trainers.train_group`, for example to compute
            the exact lookahead affinity (:func:`etap_torch.lookahead.exact_lookahead`) on the
            same steps.

    Returns:
        ``(affinity [T, T] float64, test_losses [T])``: the tracker's mean affinity
        (``A[source, target]``) and every task's test loss with the best parameters.
    """
    from etap_torch.tracker import AffinityTracker

    data = load_dataset(name)
    result = train_group(
        data,
        list(range(data.num_tasks)),
        recipe if recipe is not None else recipe_for(name),
        seed,
        make_tracker=lambda params, optimizer: AffinityTracker(params, optimizer, every=every),
        on_batch=on_batch,
    )
    affinity = result.tracker.affinity.clone()
    result.tracker.remove()
    return affinity, result.test_losses
