"""The affinity operators: typed wrappers around ``torch.ops.etap`` and their fake kernels.

Every op returns the ``[T, T]`` first-order lookahead affinity of algorithm.md section 2,
oriented ``A[source, target]``: row ``s`` is the task whose update direction is applied,
column ``t`` the task whose loss changes,

    A[s, t] = sum_k <grads[k][t], d_k[s]> / losses[t],

where ``grads[k]`` is the stack ``[T, *shape_k]`` of per-task gradients of shared parameter
``k`` and ``d_k[s]`` the update direction of source task ``s`` on that parameter (the
optimizer's displacement per unit learning rate). The ops differ in how the directions are
given: explicitly (:func:`affinity`), as ``scale * g_s + offset`` (:func:`affinity_sgd`), or
formed element by element from an Adam/AdamW state (:func:`affinity_adam`).

Common semantics:

- The output is float32, or float64 when any input tensor is float64. Half and bfloat16
  inputs are accumulated in float32, in a fixed blocked order: results are deterministic.
- A column whose loss is not finite or not positive is all zeros.
- Tensors of any layout (slices, transposes, expanded views, channels-last) are read in place,
  never copied or concatenated; zero-size tensors contribute nothing.
- All tensors must be on one device; integer and bool tensors are rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

import etap_torch._ext  # noqa: F401  (loads the operator library)

__all__ = ["affinity", "affinity_adam", "affinity_sgd"]


def affinity(grads: Sequence[Tensor], updates: Sequence[Tensor], losses: Tensor) -> Tensor:
    """Affinity from per-task gradients and explicit per-task update directions.

    Args:
        grads: one stack ``[T, *shape_k]`` per shared parameter ``k``: ``grads[k][t]`` is the
            gradient of task ``t``'s loss with respect to parameter ``k``.
        updates: one stack ``[T, *shape_k]`` per parameter: ``updates[k][s]`` is the update
            direction of source task ``s`` (displacement per unit learning rate).
        losses: ``[T]``, the loss of each task at the current parameters. A column whose
            loss is not finite or not positive is returned as zeros (pass ones to skip the
            division, e.g. for losses that can be negative).

    Returns:
        ``A`` of shape ``[T, T]`` with ``A[s, t] = sum_k <grads[k][t], updates[k][s]> /
        losses[t]`` (rows are source tasks, columns target tasks).

    Example:
        >>> import torch
        >>> from etap_torch import ops
        >>> grads = [torch.tensor([[1.0, 0.0], [1.0, 1.0]])]  # T = 2 tasks, one parameter
        >>> ops.affinity(grads, grads, torch.tensor([1.0, 2.0]))
        tensor([[1.0000, 0.5000],
                [1.0000, 1.0000]])
    """
    return torch.ops.etap.affinity(list(grads), list(updates), losses)


def affinity_sgd(
    grads: Sequence[Tensor],
    scales: Sequence[float],
    offsets: Sequence[Tensor | None],
    losses: Tensor,
) -> Tensor:
    """Affinity for the SGD family, whose direction is affine in the source's gradient.

    The direction of source task ``s`` on parameter ``k`` is
    ``scales[k] * grads[k][s] + offsets[k]``, so the op forms the Gram matrix of the
    gradients and their projections on the offsets in one pass, without materialising any
    direction.

    Args:
        grads: one stack ``[T, *shape_k]`` per shared parameter ``k``.
        scales: one number per parameter, the coefficient of the gradient.
        offsets: one task-independent tensor of shape ``shape_k`` per parameter, or ``None``
            for zero (for instance momentum and weight-decay terms).
        losses: ``[T]``, the loss of each task; a column whose loss is not finite or not
            positive is zeros.

    Returns:
        ``A`` of shape ``[T, T]``: ``A[s, t] = sum_k (scales[k] * <g_t, g_s> +
        <g_t, offsets[k]>) / losses[t]``.

    Example:
        >>> import torch
        >>> from etap_torch import ops
        >>> grads = [torch.tensor([[1.0, 0.0], [1.0, 1.0]])]
        >>> ops.affinity_sgd(grads, [2.0], [torch.tensor([0.0, 1.0])], torch.ones(2))
        tensor([[2., 3.],
                [2., 5.]])
    """
    return torch.ops.etap.affinity_sgd(
        list(grads), [float(scale) for scale in scales], list(offsets), losses
    )


def affinity_adam(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | None],
    exp_avg_sqs: Sequence[Tensor | None],
    max_exp_avg_sqs: Sequence[Tensor | None],
    beta1: Sequence[float],
    beta2: Sequence[float],
    eps: Sequence[float],
    weight_decay: Sequence[float],
    step: Sequence[float],
    decoupled: Sequence[bool],
    amsgrad: Sequence[bool],
    maximize: Sequence[bool],
    losses: Tensor,
) -> Tensor:
    """Affinity for Adam and AdamW, forming each direction element on the fly.

    Every list has one entry per shared parameter ``k``. The direction of source task ``s``
    is ``torch.optim.Adam``'s (``decoupled``: ``AdamW``'s) displacement divided by the
    learning rate, for a step taken with ``grads[k][s]`` as the only gradient from the state
    before the step:

        h = (-g if maximize else g) + weight_decay * p      (coupled decay only)
        m' = beta1 * m + (1 - beta1) * h
        v' = beta2 * v + (1 - beta2) * h * h
        w = max(v_max, v') if amsgrad else v'
        d = m' / (1 - beta1^(k+1)) / (sqrt(w) / sqrt(1 - beta2^(k+1)) + eps)
            + weight_decay * p                               (decoupled decay only)

    Args:
        grads: one stack ``[T, *shape_k]`` per shared parameter.
        params: the parameters ``p``, each of shape ``shape_k`` (read only with weight decay).
        exp_avgs: the first moments ``m`` before the step, or ``None`` for fresh state.
        exp_avg_sqs: the second moments ``v`` before the step, or ``None``.
        max_exp_avg_sqs: the running maxima ``v_max`` (read only where ``amsgrad``), or
            ``None``.
        beta1, beta2, eps, weight_decay: the parameter group's hyperparameters.
        step: the step count ``k`` before the step (bias corrections use ``k + 1``).
        decoupled: ``True`` for AdamW's decoupled weight decay.
        amsgrad, maximize: the parameter group's flags.
        losses: ``[T]``, the loss of each task; a column whose loss is not finite or not
            positive is zeros.

    Returns:
        ``A`` of shape ``[T, T]``, ``A[s, t] = sum_k <grads[k][t], d_k[s]> / losses[t]``.

    Example:
        >>> import torch
        >>> from etap_torch import ops
        >>> grads = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
        >>> ops.affinity_adam(
        ...     grads, [torch.zeros(2)], [None], [None], [None], [0.9], [0.999], [1e-8], [0.0],
        ...     [0.0], [False], [False], [False], torch.ones(2))
        tensor([[1., 0.],
                [0., 2.]])
    """
    return torch.ops.etap.affinity_adam(
        list(grads),
        list(params),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(max_exp_avg_sqs),
        [float(value) for value in beta1],
        [float(value) for value in beta2],
        [float(value) for value in eps],
        [float(value) for value in weight_decay],
        [float(value) for value in step],
        [bool(flag) for flag in decoupled],
        [bool(flag) for flag in amsgrad],
        [bool(flag) for flag in maximize],
        losses,
    )


def _fake_result(
    op_name: str, tensors: Sequence[Tensor | None], losses: Tensor, grads: Sequence[Tensor] = ()
) -> Tensor:
    """The ``[T, T]`` result's metadata, with the checks that need no data."""
    if losses.dim() != 1:
        raise RuntimeError(
            f"{op_name}: Parameter `losses` should have shape [T] (one loss per task). "
            f"Found shape {list(losses.shape)}."
        )
    for index, grad in enumerate(grads):
        if grad.dim() == 0 or grad.shape[0] != losses.shape[0]:
            raise RuntimeError(
                f"{op_name}: Parameter `grads[{index}]` should be a stack [T, ...] with "
                f"T = {losses.shape[0]} (the length of `losses`). Found shape {list(grad.shape)}."
            )
    present = [tensor for tensor in tensors if tensor is not None]
    for tensor in present:
        if not tensor.is_floating_point():
            raise RuntimeError(
                f"{op_name}: Parameter `grads` and its companions should have a floating "
                f"dtype. Found {tensor.dtype}."
            )
        if tensor.device != losses.device:
            raise RuntimeError(
                f"{op_name}: every tensor should be on the device of `losses` "
                f"({losses.device}). Found {tensor.device}."
            )
    any_double = losses.dtype == torch.float64 or any(t.dtype == torch.float64 for t in present)
    dtype = torch.float64 if any_double else torch.float32
    num_tasks = losses.shape[0]
    return losses.new_empty((num_tasks, num_tasks), dtype=dtype)


@torch.library.register_fake("etap::affinity")
def _affinity_fake(grads: list[Tensor], updates: list[Tensor], losses: Tensor) -> Tensor:
    return _fake_result("etap::affinity", [*grads, *updates], losses, grads)


@torch.library.register_fake("etap::affinity_sgd")
def _affinity_sgd_fake(
    grads: list[Tensor], scales: list[float], offsets: list[Tensor | None], losses: Tensor
) -> Tensor:
    return _fake_result("etap::affinity_sgd", [*grads, *offsets], losses, grads)


@torch.library.register_fake("etap::affinity_adam")
def _affinity_adam_fake(
    grads: list[Tensor],
    params: list[Tensor],
    exp_avgs: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    max_exp_avg_sqs: list[Tensor | None],
    beta1: list[float],
    beta2: list[float],
    eps: list[float],
    weight_decay: list[float],
    step: list[float],
    decoupled: list[bool],
    amsgrad: list[bool],
    maximize: list[bool],
    losses: Tensor,
) -> Tensor:
    read_maxima = [m for m, flag in zip(max_exp_avg_sqs, amsgrad, strict=False) if flag]
    tensors = [*grads, *params, *exp_avgs, *exp_avg_sqs, *read_maxima]
    return _fake_result("etap::affinity_adam", tensors, losses, grads)
