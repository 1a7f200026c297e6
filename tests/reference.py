"""Float64 references of the affinity operators, written for clarity, not speed.

They form every update direction explicitly and take the inner products one by one,
so they share no code path with the fused kernels they check. Signatures match
`torch.ops.etap.affinity`, `affinity_sgd` and `affinity_adam`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _normalised(numerator: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Divides column t of `numerator` [T, T] by `losses[t]`; a bad loss zeroes its column."""
    losses = losses.detach().to(torch.float64)
    valid = torch.isfinite(losses) & (losses > 0)
    safe = torch.where(valid, losses, torch.ones_like(losses))
    return torch.where(valid[None, :], numerator / safe[None, :], torch.zeros_like(numerator))


def affinity(
    grads: Sequence[torch.Tensor], updates: Sequence[torch.Tensor], losses: torch.Tensor
) -> torch.Tensor:
    """A[s, t] = sum_k <grads[k][t], updates[k][s]> / losses[t], in float64.

    Args:
        grads: per shared parameter k, the per-task gradients [T, *shape_k].
        updates: per shared parameter k, the update directions [T, *shape_k].
        losses: [T] per-task losses.
    """
    num_tasks = losses.shape[0]
    numerator = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for grad, update in zip(grads, updates, strict=True):
        grad_rows = grad.detach().to(torch.float64).reshape(num_tasks, -1)
        update_rows = update.detach().to(torch.float64).reshape(num_tasks, -1)
        numerator += update_rows @ grad_rows.T
    return _normalised(numerator, losses)


def sgd_directions(
    grads: Sequence[torch.Tensor], scales: Sequence[float], offsets: Sequence[torch.Tensor | None]
) -> list[torch.Tensor]:
    """The SGD-family directions d_k[s] = scales[k] * grads[k][s] + offsets[k], float64."""
    directions = []
    for grad, scale, offset in zip(grads, scales, offsets, strict=True):
        direction = float(scale) * grad.detach().to(torch.float64)
        if offset is not None:
            direction = direction + offset.detach().to(torch.float64)
        directions.append(direction)
    return directions


def affinity_sgd(
    grads: Sequence[torch.Tensor],
    scales: Sequence[float],
    offsets: Sequence[torch.Tensor | None],
    losses: torch.Tensor,
) -> torch.Tensor:
    """Reference of `etap::affinity_sgd`: the SGD-family directions, then `affinity`."""
    return affinity(grads, sgd_directions(grads, scales, offsets), losses)


def adam_directions(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor | None],
    exp_avg_sqs: Sequence[torch.Tensor | None],
    max_exp_avg_sqs: Sequence[torch.Tensor | None],
    beta1: Sequence[float],
    beta2: Sequence[float],
    eps: Sequence[float],
    weight_decay: Sequence[float],
    step: Sequence[float],
    decoupled: Sequence[bool],
    amsgrad: Sequence[bool],
    maximize: Sequence[bool],
) -> list[torch.Tensor]:
    """Adam's displacement per unit learning rate for each task's gradient, float64."""
    directions = []
    for k, grad in enumerate(grads):
        grad = grad.detach().to(torch.float64)
        param = params[k].detach().to(torch.float64)
        zeros = torch.zeros_like(param)
        exp_avg = zeros if exp_avgs[k] is None else exp_avgs[k].detach().to(torch.float64)
        exp_avg_sq = zeros if exp_avg_sqs[k] is None else exp_avg_sqs[k].detach().to(torch.float64)

        signed = -grad if maximize[k] else grad
        if weight_decay[k] != 0 and not decoupled[k]:
            signed = signed + weight_decay[k] * param
        new_exp_avg = beta1[k] * exp_avg + (1 - beta1[k]) * signed
        new_exp_avg_sq = beta2[k] * exp_avg_sq + (1 - beta2[k]) * signed * signed
        if amsgrad[k]:
            previous_max = max_exp_avg_sqs[k]
            previous_max = zeros if previous_max is None else previous_max.to(torch.float64)
            new_exp_avg_sq = torch.maximum(previous_max, new_exp_avg_sq)

        count = step[k] + 1
        bias_correction1 = 1 - beta1[k] ** count
        bias_correction2 = 1 - beta2[k] ** count
        denominator = (new_exp_avg_sq / bias_correction2).sqrt() + eps[k]
        direction = new_exp_avg / bias_correction1 / denominator
        if weight_decay[k] != 0 and decoupled[k]:
            direction = direction + weight_decay[k] * param
        directions.append(direction)
    return directions


def affinity_adam(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor | None],
    exp_avg_sqs: Sequence[torch.Tensor | None],
    max_exp_avg_sqs: Sequence[torch.Tensor | None],
    beta1: Sequence[float],
    beta2: Sequence[float],
    eps: Sequence[float],
    weight_decay: Sequence[float],
    step: Sequence[float],
    decoupled: Sequence[bool],
    amsgrad: Sequence[bool],
    maximize: Sequence[bool],
    losses: torch.Tensor,
) -> torch.Tensor:
    """Reference of `etap::affinity_adam`: Adam's directions formed explicitly, then `affinity`."""
    directions = adam_directions(
        grads,
        params,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
        decoupled,
        amsgrad,
        maximize,
    )
    return affinity(grads, directions, losses)
