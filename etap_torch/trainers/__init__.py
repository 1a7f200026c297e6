"""Multi-task trainers for the bundled datasets: one group at a time (an ordinary PyTorch loop
that accepts an affinity tracker) or many groups at once (a batched model)."""

from etap_torch.trainers.batched import BatchedResult, train_groups
from etap_torch.trainers.recipe import Recipe, all_groups, initial_parameters
from etap_torch.trainers.recipes import CHEMICAL_RECIPE, ETTH1_RECIPE, load_dataset, recipe_for
from etap_torch.trainers.single import GroupResult, SharedTrunkModel, build_model, train_group
from etap_torch.trainers.tracked import train_all_with_affinity

__all__ = [
    "CHEMICAL_RECIPE",
    "ETTH1_RECIPE",
    "BatchedResult",
    "GroupResult",
    "Recipe",
    "SharedTrunkModel",
    "all_groups",
    "build_model",
    "initial_parameters",
    "load_dataset",
    "recipe_for",
    "train_all_with_affinity",
    "train_group",
    "train_groups",
]
