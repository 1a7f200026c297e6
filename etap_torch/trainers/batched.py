"""Train many group models at once as one batched model.

Every group model follows :func:`etap_torch.trainers.train_group`'s recipe exactly: the same
seeded initial parameters, the same per-task minibatch streams, the sum of its members' mean
losses, Adam with torch's update rule, and early stopping on its own summed validation loss
with the best parameters restored. The parameters of all groups carry a leading group
dimension; the first layer of every group is one matrix product over the concatenated
minibatch, later layers are batched matrix products. A group only learns from its members'
data because the losses of non-members are masked out of its objective. Groups that stop
early are dropped from the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from etap_torch.datasets._common import MultiTaskData
from etap_torch.trainers.recipe import Recipe, TaskStream, initial_parameters, membership_matrix

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class BatchedResult:
    """Results of :func:`train_groups`.

    Attributes:
        groups: ``[N, T]`` bool membership.
        test_losses: ``[N, T]`` float64 test loss of every member at its group's best epoch,
            0 off the membership.
        validation_losses: ``[N, T]`` float64 validation losses at the best epoch, 0 off the
            membership.
        best_epoch: ``[N]`` epoch (1-based) whose parameters were restored.
        epochs: ``[N]`` epochs trained.
    """

    groups: torch.Tensor
    test_losses: torch.Tensor
    validation_losses: torch.Tensor
    best_epoch: torch.Tensor
    epochs: torch.Tensor


class GroupBatch:
    """Parameters of many group models; dimension ``group_dims[i]`` of ``params[i]`` indexes the
    group.

    Layout: the first trunk layer ``[in + 1, G, out]`` (weight rows, then the bias as the last
    row, so that one matrix product over inputs with an appended 1 serves all groups), later
    trunk weights ``[G, in, out]`` and biases ``[G, out]``, head weights
    ``[G, T, hidden, head_dim]`` and head biases ``[G, T, head_dim]``. Adam acts elementwise,
    so keeping weight and bias in one tensor changes nothing in the updates.
    """

    def __init__(self, recipe: Recipe, num_tasks: int, num_groups: int, seed: int) -> None:
        start = initial_parameters(recipe, num_tasks, seed)
        params, group_dims = [], []
        for layer, (weight, bias) in enumerate(start.trunk):
            if layer == 0:
                weight_and_bias = torch.cat([weight, bias[None]])
                params.append(weight_and_bias[:, None, :].expand(-1, num_groups, -1))
                group_dims.append(1)
            else:
                params.append(weight[None].expand(num_groups, -1, -1))
                params.append(bias[None].expand(num_groups, -1))
                group_dims += [0, 0]
        params.append(start.head_weight[None].expand(num_groups, -1, -1, -1))
        params.append(start.head_bias[None].expand(num_groups, -1, -1))
        group_dims += [0, 0]
        self.params = [p.to(torch.float32).contiguous().requires_grad_() for p in params]
        self.group_dims = group_dims
        self.num_trunk_layers = len(start.trunk)

    @property
    def num_groups(self) -> int:
        return self.params[-1].shape[0]

    def trunk(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs [R, in]`` -> ``[G, R, hidden]`` trunk features of every group."""
        first_layer = self.params[0]
        width_in, groups, width_out = first_layer.shape
        with_ones = torch.cat([inputs, inputs.new_ones(inputs.shape[0], 1)], dim=1)
        hidden = torch.relu_(with_ones @ first_layer.view(width_in, groups * width_out))
        hidden = hidden.view(-1, groups, width_out).transpose(0, 1)
        for layer in range(1, self.num_trunk_layers):
            weight, bias = self.params[2 * layer - 1], self.params[2 * layer]
            hidden = torch.relu(torch.baddbmm(bias[:, None, :], hidden, weight))
        return hidden

    def heads(self, features: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """Apply the heads of ``tasks`` to their rows.

        Args:
            features: ``[G, len(tasks), n, hidden]``: ``n`` rows of each task.

        Returns:
            ``[G, len(tasks), n, head_dim]``.
        """
        weight, bias = self.params[-2], self.params[-1]
        if len(tasks) < weight.shape[1]:
            weight, bias = weight[:, tasks], bias[:, tasks]
        return torch.matmul(features, weight) + bias[:, :, None, :]

    def head(self, features: torch.Tensor, task: int) -> torch.Tensor:
        """``features [G, n, hidden]`` of task ``task`` -> ``[G, n, head_dim]``."""
        weight, bias = self.params[-2], self.params[-1]
        return torch.baddbmm(bias[:, task, None, :], features, weight[:, task])

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the groups at positions ``keep`` (``[G']`` long)."""
        self.params = [
            p.detach().index_select(dim, keep).requires_grad_()
            for p, dim in zip(self.params, self.group_dims, strict=True)
        ]

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]


def losses_per_group(outputs: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss over samples, per group (and task).

    Args:
        outputs: ``[*lead, n, head_dim]``.
        targets: ``[n]`` labels or ``[n, head_dim]`` values, or with the same trailing ``*lead``
            suffix as ``outputs`` allows broadcasting (``[T, n]`` / ``[T, n, head_dim]``).

    Returns:
        ``[*lead]``.
    """
    if kind == "bce":
        expanded = targets.expand(outputs.shape[:-1])
        per_sample = F.binary_cross_entropy_with_logits(outputs[..., 0], expanded, reduction="none")
        return per_sample.mean(dim=-1)
    return (outputs - targets).square().mean(dim=-1).mean(dim=-1)


class BatchedAdam:
    """torch.optim.Adam's update (default settings, no weight decay) on the batched parameters,
    with state that follows :meth:`GroupBatch.select`."""

    def __init__(self, batch: GroupBatch, learning_rate: float) -> None:
        self.batch = batch
        self.learning_rate = learning_rate
        self.exp_avgs = [torch.zeros_like(p) for p in batch.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in batch.params]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = ADAM_BETAS
        self.steps += 1
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        step_size = self.learning_rate / bias_correction1
        for param, exp_avg, exp_avg_sq in zip(
            self.batch.params, self.exp_avgs, self.exp_avg_sqs, strict=True
        ):
            grad = param.grad
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
            param.addcdiv_(exp_avg, denom, value=-step_size)
            param.grad = None

    def select(self, keep: torch.Tensor) -> None:
        dims = self.batch.group_dims
        self.exp_avgs = [s.index_select(d, keep) for s, d in zip(self.exp_avgs, dims, strict=True)]
        self.exp_avg_sqs = [
            s.index_select(d, keep) for s, d in zip(self.exp_avg_sqs, dims, strict=True)
        ]


@torch.no_grad()
def evaluate(batch: GroupBatch, data: MultiTaskData, split: str, kind: str) -> torch.Tensor:
    """``[G, T]`` mean loss of every task's ``split`` under every group's parameters."""
    columns = []
    for task in range(data.num_tasks):
        part = getattr(data[task], split)
        outputs = batch.head(batch.trunk(part.inputs), task)
        columns.append(losses_per_group(outputs, part.targets, kind))
    return torch.stack(columns, dim=1).double()


def train_groups(
    data: MultiTaskData,
    groups: torch.Tensor,
    recipe: Recipe,
    seed: int,
    *,
    on_epoch: Callable[[int, int], None] | None = None,
) -> BatchedResult:
    """Train one model per group, all at once, and report each member's test loss.

    Args:
        data: the dataset.
        groups: ``[N, T]`` bool membership, every row non-empty.
        recipe: architecture and training settings, as for
            :func:`etap_torch.trainers.train_group`.
        seed: the seed every group model uses (as ``train_group(..., seed)`` would).
        on_epoch: called after every epoch with ``(epoch, groups still training)``.

    Returns:
        :class:`BatchedResult`.
    """
    groups = membership_matrix(groups, data.num_tasks)
    num_groups, num_tasks = groups.shape
    batch = GroupBatch(recipe, num_tasks, num_groups, seed)
    optimizer = BatchedAdam(batch, recipe.learning_rate)
    streams = [
        TaskStream(len(data[task].train), recipe.batch_size, seed, task)
        for task in range(num_tasks)
    ]
    trained_tasks = [task for task in range(num_tasks) if bool(groups[:, task].any())]

    active = torch.arange(num_groups)
    mask = groups.float()
    best_params = batch.snapshot()
    best_loss = torch.full((num_groups,), float("inf"), dtype=torch.float64)
    best_epoch = torch.zeros(num_groups, dtype=torch.long)
    epochs = torch.zeros(num_groups, dtype=torch.long)

    for epoch in range(1, recipe.max_epochs + 1):
        for _ in range(recipe.steps_per_epoch):
            inputs, targets = [], []
            for task in trained_tasks:
                index = streams[task].next()
                inputs.append(data[task].train.inputs[index])
                targets.append(data[task].train.targets[index])
            features = batch.trunk(torch.cat(inputs))
            features = features.view(features.shape[0], len(trained_tasks), recipe.batch_size, -1)
            outputs = batch.heads(features, trained_tasks)
            task_losses = losses_per_group(outputs, torch.stack(targets), recipe.loss)
            (task_losses * mask[active][:, trained_tasks]).sum().backward()
            optimizer.step()

        validation = evaluate(batch, data, "validation", recipe.loss)
        group_loss = (validation * groups[active]).sum(dim=1)
        epochs[active] = epoch
        improved = group_loss < best_loss[active]
        if bool(improved.any()):
            positions = improved.nonzero().squeeze(1)
            targets_index = active[positions]
            best_loss[targets_index] = group_loss[positions]
            best_epoch[targets_index] = epoch
            for store, param, dim in zip(best_params, batch.params, batch.group_dims, strict=True):
                store.index_copy_(dim, targets_index, param.detach().index_select(dim, positions))
        still = (epoch - best_epoch[active]) < recipe.patience
        if on_epoch is not None:
            on_epoch(epoch, int(still.sum()))
        if not bool(still.any()):
            break
        if not bool(still.all()):
            keep = still.nonzero().squeeze(1)
            batch.select(keep)
            optimizer.select(keep)
            active = active[keep]

    batch.params = best_params
    test = evaluate(batch, data, "test", recipe.loss) * groups
    validation = evaluate(batch, data, "validation", recipe.loss) * groups
    return BatchedResult(groups, test, validation, best_epoch, epochs)
