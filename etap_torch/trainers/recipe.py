"""What a group model is and how it is trained: the recipe shared by the single-group and the
batched trainer, the seeded initial parameters and the per-task minibatch streams."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Recipe:
    """A shared ReLU trunk with one linear head per task, trained with Adam and early stopping.

    Attributes:
        trunk_dims: widths of the trunk, input first (chemical: ``(180, 32, 16)``); a ReLU follows
            every trunk layer.
        head_dim: outputs of each task's head (1 logit, or the forecast horizon).
        loss: ``"bce"`` (binary cross-entropy on logits) or ``"mse"``.
        learning_rate: Adam's learning rate (other Adam settings are torch's defaults).
        batch_size: samples drawn from *every* member task at each step.
        steps_per_epoch: steps between two validation checks.
        max_epochs: at most this many epochs.
        patience: stop after this many epochs without a lower validation loss; the parameters of
            the best epoch are restored.
    """

    trunk_dims: tuple[int, ...]
    head_dim: int
    loss: str
    learning_rate: float
    batch_size: int
    steps_per_epoch: int
    max_epochs: int
    patience: int

    def __post_init__(self) -> None:
        if self.loss not in ("bce", "mse"):
            raise ValueError(f"Parameter `loss` should be 'bce' or 'mse'. Found {self.loss!r}.")
        if len(self.trunk_dims) < 2:
            raise ValueError(
                f"Parameter `trunk_dims` should list at least two widths. Found {self.trunk_dims}."
            )
        for name in ("batch_size", "steps_per_epoch", "max_epochs", "patience", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"Parameter `{name}` should be a positive integer. Found {getattr(self, name)}."
                )

    def to_dict(self) -> dict:
        return asdict(self)


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss over the leading sample dimension.

    Args:
        outputs: ``[n, *rest, head_dim]`` head outputs; ``rest`` are extra batch dimensions
            (for example groups) that are kept.
        targets: ``[n]`` labels (``"bce"``, head_dim 1) or ``[n, head_dim]`` values (``"mse"``),
            broadcast over ``rest``.

    Returns:
        ``[*rest]`` loss per extra index, averaged over samples (and outputs for ``"mse"``).
    """
    extra = outputs.dim() - 2
    if kind == "bce":
        shaped = targets.reshape(targets.shape[0], *([1] * extra)).expand(outputs.shape[:-1])
        per_sample = F.binary_cross_entropy_with_logits(outputs[..., 0], shaped, reduction="none")
        return per_sample.mean(dim=0)
    shaped = targets.reshape(targets.shape[0], *([1] * extra), targets.shape[-1])
    return (outputs - shaped).square().mean(dim=-1).mean(dim=0)


@dataclass
class InitialParameters:
    """The seeded starting point every group model of one seed shares.

    Attributes:
        trunk: ``[(weight [in, out], bias [out])]`` per trunk layer.
        head_weight: ``[T, hidden, head_dim]`` one head per task.
        head_bias: ``[T, head_dim]``.
    """

    trunk: list[tuple[torch.Tensor, torch.Tensor]]
    head_weight: torch.Tensor
    head_bias: torch.Tensor


def initial_parameters(recipe: Recipe, num_tasks: int, seed: int) -> InitialParameters:
    """Draw the initial parameters of a seed, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as torch's
    ``nn.Linear`` does.

    Every group model of the same seed starts from these values (a task's head is the same in
    every group containing it), so that the gain of a group measures grouping, not the luck of
    an initialisation.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound

    trunk = []
    for width_in, width_out in itertools.pairwise(recipe.trunk_dims):
        trunk.append((uniform((width_in, width_out), width_in), uniform((width_out,), width_in)))
    hidden = recipe.trunk_dims[-1]
    head_weight = uniform((num_tasks, hidden, recipe.head_dim), hidden)
    head_bias = uniform((num_tasks, recipe.head_dim), hidden)
    return InitialParameters(trunk, head_weight, head_bias)


class TaskStream:
    """Endless minibatch indices of one task: reshuffled passes over its training samples.

    The stream of task ``t`` depends only on ``(seed, t)``, so a task sees the same minibatches
    in every group; tasks with fewer samples wrap around sooner (oversampling).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, task: int) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rng = np.random.default_rng([seed, task, 7919])
        self.pending = np.empty(0, dtype=np.int64)

    def next(self) -> torch.Tensor:
        """Return ``[batch_size]`` sample indices."""
        while self.pending.size < self.batch_size:
            self.pending = np.concatenate([self.pending, self.rng.permutation(self.num_samples)])
        batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return torch.from_numpy(batch)


def membership_matrix(groups: torch.Tensor | np.ndarray, num_tasks: int) -> torch.Tensor:
    """Check a membership matrix and return it as ``[N, T]`` bool."""
    groups = torch.as_tensor(groups)
    if groups.dim() != 2 or groups.shape[1] != num_tasks:
        raise ValueError(
            f"Parameter `groups` should be a [N, {num_tasks}] membership matrix. "
            f"Found shape {tuple(groups.shape)}."
        )
    groups = groups.bool()
    if not bool(groups.any(dim=1).all()):
        raise ValueError(
            "Parameter `groups` should have at least one task per row. Found an empty row."
        )
    return groups


def all_groups(num_tasks: int) -> torch.Tensor:
    """Every non-empty group ordered by bitmask (bit ``t`` = task ``t``): ``[2^T - 1, T]`` bool."""
    masks = torch.arange(1, 2**num_tasks)
    return (masks[:, None] >> torch.arange(num_tasks)[None, :]) & 1 == 1
