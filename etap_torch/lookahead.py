"""The exact lookahead affinity of TAG, the reference the first-order tracker approximates.

For each source task `s` a real trial step is taken on the shared parameters alone, with
`s`'s gradient as the only gradient and the optimizer's own update rule and state, and
every task's loss is evaluated again at the moved parameters (algorithm.md section 2):

    Z[s, t] = (1 - L_t(theta - u_s) / L_t(theta)) / eta

with `u_s` the trial displacement and `eta` the learning rate of the trial step. This
costs one backward per task and one forward per source task on every measured step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["exact_lookahead"]


def _error(name: str, expectation: str, found: str) -> str:
    return f"Parameter `{name}` should {expectation}. Found {found}."


def exact_lookahead(
    compute_losses: Callable[[], Sequence[torch.Tensor]],
    shared_params: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    model: torch.nn.Module | None = None,
    lr: float | None = None,
    normalize: str = "loss",
) -> torch.Tensor:
    """TAG's lookahead affinity `Z[source, target]` of the current step, per unit learning rate.

    Args:
        compute_losses: evaluates the `T` per-task losses of the current batch at the current
            parameters (a closure over the model and the batch).
        shared_params: the shared parameters; only they move in a trial step, the heads and
            every other parameter stay as they are.
        optimizer: the training optimizer. Its class, hyperparameters and state before the
            step define the trial step; a copy takes the step, the optimizer is untouched.
        model: the module whose buffers (BatchNorm running statistics) the forward passes
            must leave alone: they update copies. The random number generator state is
            restored before every forward too, so every forward sees the same dropout masks,
            and after the call, so training continues unchanged.
        lr: the learning rate of the trial steps; default the optimizer's (which must then be
            one positive value over the shared parameters' groups).
        normalize: `"loss"` gives TAG's relative score above; `"none"` gives
            `(L_t(theta) - L_t(theta - u_s)) / eta`.

    Returns:
        [T, T] float64 tensor on the CPU; rows are sources, columns targets. A column whose
        base loss is not finite or not positive is NaN under `normalize="loss"`.

    Every parameter's `.grad`, every buffer of `model`, the optimizer's state and the
    global random state are the same after the call as before it. The trial steps move the
    shared parameters in place (and back), so a graph built before the call cannot be
    back-propagated after it: call this before the training step's forward pass.
    """
    params = list(shared_params)
    if not params:
        raise ValueError(
            _error("shared_params", "contain at least one parameter", "an empty collection")
        )
    if normalize not in ("loss", "none"):
        raise ValueError(_error("normalize", 'be "loss" or "none"', repr(normalize)))
    step_size = _trial_learning_rate(optimizer, params, lr)

    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        rng_state = _rng_state(devices)
        with _private_buffers(model):
            losses = list(compute_losses())
        base_losses = torch.stack([loss.detach().reshape(()) for loss in losses])
        per_task_grads = [
            torch.autograd.grad(
                loss,
                params,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            if loss.requires_grad
            else tuple(torch.zeros_like(p) for p in params)
            for loss in losses
        ]

        trial_losses = []
        for source_grads in per_task_grads:
            with _trial_step(optimizer, params, source_grads, step_size), _private_buffers(model):
                _set_rng_state(devices, rng_state)
                with torch.no_grad():
                    moved = torch.stack([loss.reshape(()) for loss in compute_losses()])
            trial_losses.append(moved.detach())

    base = base_losses.to("cpu", torch.float64)
    moved = torch.stack(trial_losses).to("cpu", torch.float64)
    decrease = base[None, :] - moved
    if normalize == "none":
        return decrease / step_size
    valid = torch.isfinite(base) & (base > 0)
    safe_base = torch.where(valid, base, torch.ones_like(base))
    return torch.where(valid[None, :], decrease / safe_base[None, :] / step_size, math.nan)


def _trial_learning_rate(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], lr: float | None
) -> float:
    if lr is not None:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(_error("lr", "be a positive finite number", repr(lr)))
        return float(lr)
    shared = {id(p) for p in params}
    rates = {
        float(group["lr"])
        for group in optimizer.param_groups
        if any(id(p) in shared for p in group["params"])
    }
    if len(rates) != 1 or not next(iter(rates)) > 0:
        raise ValueError(
            _error(
                "lr",
                "be given when the shared parameters' groups do not share one positive "
                "learning rate",
                f"learning rates {sorted(rates)}",
            )
        )
    return rates.pop()


class _trial_step:
    """Moves the shared parameters by one step of a copy of the optimizer, then puts back
    the parameters and their `.grad` bit for bit."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        source_grads: Sequence[torch.Tensor],
        lr: float,
    ) -> None:
        self.optimizer = optimizer
        self.params = params
        self.source_grads = source_grads
        self.lr = lr

    def __enter__(self) -> None:
        self.saved_values = [p.detach().clone() for p in self.params]
        self.saved_grads = [p.grad for p in self.params]
        shared = {id(p) for p in self.params}
        groups = []
        for group in self.optimizer.param_groups:
            members = [p for p in group["params"] if id(p) in shared]
            if members:
                settings = {key: value for key, value in group.items() if key != "params"}
                groups.append({**settings, "params": members, "lr": self.lr})
        shadow = type(self.optimizer)(groups)
        for param in self.params:
            if param in self.optimizer.state:
                shadow.state[param] = copy.deepcopy(self.optimizer.state[param])
        for param, grad in zip(self.params, self.source_grads, strict=True):
            param.grad = grad.detach().clone().to(param.dtype)
        shadow.step()

    def __exit__(self, *exc_info: object) -> None:
        with torch.no_grad():
            for param, value, grad in zip(
                self.params, self.saved_values, self.saved_grads, strict=True
            ):
                param.copy_(value)
                param.grad = grad


class _private_buffers:
    """Lets a forward pass update copies of the module's buffers (BatchNorm statistics).

    The original buffer tensors are put back untouched, so their values and the version
    counters an existing graph checks stay as they were.
    """

    def __init__(self, model: torch.nn.Module | None) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.originals = []
        if self.model is None:
            return
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    self.originals.append((module, name, buffer))
                    module._buffers[name] = buffer.detach().clone()

    def __exit__(self, *exc_info: object) -> None:
        for module, name, buffer in self.originals:
            module._buffers[name] = buffer


def _rng_state(devices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda_states = [torch.cuda.get_rng_state(device) for device in devices]
    return torch.get_rng_state(), cuda_states


def _set_rng_state(devices: list[int], state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    cpu_state, cuda_states = state
    torch.set_rng_state(cpu_state)
    for device, cuda_state in zip(devices, cuda_states, strict=True):
        torch.cuda.set_rng_state(cuda_state, device)
