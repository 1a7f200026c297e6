"""Train one group of tasks as an ordinary PyTorch multi-task model."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from etap_torch.datasets._common import MultiTaskData
from etap_torch.trainers.recipe import Recipe, TaskStream, initial_parameters, task_loss


class SharedTrunkModel(nn.Module):
    """A shared ReLU MLP trunk and one linear head per member task.

    ``forward(inputs [n, trunk_dims[0]], head)`` returns ``[n, head_dim]`` outputs of head
    ``head`` (the position of the task among the members).
    """

    def __init__(self, trunk_dims: Sequence[int], head_dim: int, num_heads: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(trunk_dims):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(trunk_dims[-1], head_dim) for _ in range(num_heads))

    def forward(self, inputs: torch.Tensor, head: int) -> torch.Tensor:
        return self.heads[head](self.trunk(inputs))

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())


def build_model(
    recipe: Recipe, members: Sequence[int], num_tasks: int, seed: int
) -> SharedTrunkModel:
    """The group model of ``members`` with the seed's shared initial parameters (float32)."""
    start = initial_parameters(recipe, num_tasks, seed)
    model = SharedTrunkModel(recipe.trunk_dims, recipe.head_dim, len(members))
    linears = [layer for layer in model.trunk if isinstance(layer, nn.Linear)]
    with torch.no_grad():
        for linear, (weight, bias) in zip(linears, start.trunk, strict=True):
            linear.weight.copy_(weight.T)
            linear.bias.copy_(bias)
        for head, task in zip(model.heads, members, strict=True):
            head.weight.copy_(start.head_weight[task].T)
            head.bias.copy_(start.head_bias[task])
    return model


@dataclass
class GroupResult:
    """What training one group produced.

    Attributes:
        members: task indices of the group.
        test_losses: ``[len(members)]`` test loss of each member with the restored best parameters.
        validation_losses: ``[len(members)]`` validation loss of each member at the best epoch.
        best_epoch: the epoch (1-based) whose parameters were restored.
        epochs: epochs trained.
        model: the trained model with the best parameters.
        tracker: the affinity tracker when one was requested, else None.
        history: the summed validation loss after every epoch.
    """

    members: list[int]
    test_losses: torch.Tensor
    validation_losses: torch.Tensor
    best_epoch: int
    epochs: int
    model: SharedTrunkModel
    tracker: Any = None
    history: list[float] = field(default_factory=list)


@torch.no_grad()
def split_losses(
    model: SharedTrunkModel, data: MultiTaskData, members: Sequence[int], split: str, kind: str
) -> torch.Tensor:
    """``[len(members)]`` mean loss of each member on one split (``"validation"`` / ``"test"``)."""
    losses = []
    for head, task in enumerate(members):
        part = getattr(data[task], split)
        losses.append(task_loss(model(part.inputs, head), part.targets, kind))
    return torch.stack(losses)


def train_group(
    data: MultiTaskData,
    members: Sequence[int],
    recipe: Recipe,
    seed: int,
    *,
    make_tracker: Callable[[list[nn.Parameter], torch.optim.Optimizer], Any] | None = None,
    on_batch: Callable[
        [SharedTrunkModel, Callable[[], list[torch.Tensor]], torch.optim.Optimizer], None
    ]
    | None = None,
) -> GroupResult:
    """Train one group model and report each member's test loss.

    Each step draws ``recipe.batch_size`` samples from every member (from the task's own
    stream, so smaller tasks are oversampled to the pace of the largest) and minimises the sum
    over members of their mean loss with Adam. After every ``recipe.steps_per_epoch`` steps the
    summed validation loss is checked; training stops after ``recipe.patience`` epochs without
    improvement (or ``recipe.max_epochs``) and the best parameters are restored.

    Args:
        data: the dataset (see :mod:`etap_torch.datasets`).
        members: task indices of the group, distinct.
        recipe: architecture and training settings.
        seed: selects the initial parameters and the minibatch streams.
        make_tracker: called once as ``make_tracker(shared_params, optimizer)``; the object it
            returns receives ``backward(per_task_losses)`` in place of the summed backward (an
            :class:`etap_torch.AffinityTracker` fits).
        on_batch: called at every step before its forward pass as
            ``on_batch(model, compute_losses, optimizer)``; ``compute_losses()`` evaluates the
            per-member losses of the step's minibatch at the current parameters (what
            :func:`etap_torch.lookahead.exact_lookahead` needs).

    Returns:
        :class:`GroupResult`.
    """
    members = [int(task) for task in members]
    if not members or len(set(members)) != len(members):
        raise ValueError(f"Parameter `members` should list distinct task indices. Found {members}.")
    if min(members) < 0 or max(members) >= data.num_tasks:
        raise ValueError(
            f"Parameter `members` should hold indices in [0, {data.num_tasks}). Found {members}."
        )

    model = build_model(recipe, members, data.num_tasks, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    tracker = make_tracker(model.shared_parameters(), optimizer) if make_tracker else None
    streams = [TaskStream(len(data[task].train), recipe.batch_size, seed, task) for task in members]

    best_loss = float("inf")
    best_state = copy.deepcopy(model.state_dict())
    best_epoch = 0
    history = []
    epoch = 0
    for epoch in range(1, recipe.max_epochs + 1):
        model.train()
        for _ in range(recipe.steps_per_epoch):
            batch = []
            for head, (task, stream) in enumerate(zip(members, streams, strict=True)):
                index = stream.next()
                train = data[task].train
                batch.append((head, train.inputs[index], train.targets[index]))

            def compute_losses(batch: list = batch) -> list[torch.Tensor]:
                return [
                    task_loss(model(inputs, head), targets, recipe.loss)
                    for head, inputs, targets in batch
                ]

            if on_batch is not None:
                on_batch(model, compute_losses, optimizer)
            step_losses = compute_losses()
            optimizer.zero_grad(set_to_none=True)
            if tracker is not None:
                tracker.backward(step_losses)
            else:
                torch.stack(step_losses).sum().backward()
            optimizer.step()

        model.eval()
        validation_loss = float(split_losses(model, data, members, "validation", recipe.loss).sum())
        history.append(validation_loss)
        if validation_loss < best_loss:
            best_loss, best_epoch = validation_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= recipe.patience:
            break

    model.load_state_dict(best_state)
    model.eval()
    return GroupResult(
        members=members,
        test_losses=split_losses(model, data, members, "test", recipe.loss),
        validation_losses=split_losses(model, data, members, "validation", recipe.loss),
        best_epoch=best_epoch,
        epochs=epoch,
        model=model,
        tracker=tracker,
        history=history,
    )
