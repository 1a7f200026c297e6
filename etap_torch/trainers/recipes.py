"""The recipes used for the bundled datasets and their committed ground truth."""

from __future__ import annotations

from etap_torch.datasets import MultiTaskData, load_chemical, load_etth1
from etap_torch.trainers.recipe import Recipe

CHEMICAL_RECIPE = Recipe(
    trunk_dims=(180, 32, 16),
    head_dim=1,
    loss="bce",
    learning_rate=3e-3,
    batch_size=32,
    steps_per_epoch=10,
    max_epochs=30,
    patience=3,
)

ETTH1_RECIPE = Recipe(
    trunk_dims=(96, 32, 32),
    head_dim=24,
    loss="mse",
    learning_rate=3e-3,
    batch_size=64,
    steps_per_epoch=10,
    max_epochs=40,
    patience=4,
)


def recipe_for(name: str) -> Recipe:
    """The recipe of a bundled dataset, ``"chemical"`` or ``"etth1"``."""
    recipes = {"chemical": CHEMICAL_RECIPE, "etth1": ETTH1_RECIPE}
    if name not in recipes:
        raise ValueError(f"Parameter `name` should be one of {sorted(recipes)}. Found {name!r}.")
    return recipes[name]


def load_dataset(name: str) -> MultiTaskData:
    """Load a bundled dataset with the settings its recipe and the ground truth use.

    chemical: validation split seed 0. ETTh1: 96-hour history, 24-hour horizon, every 4th
    validation window.
    """
    if name == "chemical":
        return load_chemical(split_seed=0)
    if name == "etth1":
        return load_etth1(history=96, horizon=24, validation_stride=4)
    raise ValueError(f"Parameter `name` should be 'chemical' or 'etth1'. Found {name!r}.")
