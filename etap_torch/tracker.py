"""Measure task affinity inside an ordinary training loop.

Two lines change in the user's loop::

    tracker = AffinityTracker(model.trunk.parameters(), optimizer)
    ...
    tracker.backward(losses)      # in place of sum(losses).backward()
    optimizer.step()              # a step pre-hook scores the step

On a measured step, `backward` also takes the per-task gradients of the shared
parameters; the optimizer step pre-hook turns the optimizer's hyperparameters and
state *before* the step into each task's update direction and scores the step with
the fused affinity operators (algorithm.md section 2):

    A[s, t] = <g_t, d_s> / L_t     (source s, target t, d_s per unit learning rate)

Steps are aggregated per entry with Welford's algorithm (algorithm.md section 3).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = ["AffinityTracker", "DirectionFn"]

DirectionFn = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]
"""Maps the per-task gradients [T, *shape_k] of every shared parameter k to the update
directions [T, *shape_k] the optimizer would take for each task alone, per unit learning rate."""

_STATE_VERSION = 1


def _error(name: str, expectation: str, found: str) -> str:
    return f"Parameter `{name}` should {expectation}. Found {found}."


def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class AffinityTracker:
    """Tracks the first-order task affinity `A[source, target]` of a training run.

    Args:
        shared_params: the shared parameters `theta` (the trunk); at least one, each
            requiring a gradient, none twice, all owned by `optimizer`.
        optimizer: the optimizer that steps the model. `torch.optim.SGD`, `Adam` and
            `AdamW` are supported with all their flags and with several parameter groups;
            any other optimizer needs `direction_fn`.
        every: measure every `every`-th optimizer step (the first step is measured).
        normalize: `"loss"` divides column `t` by the target loss `L_t` (a step whose
            target loss is not finite or not positive is missing for that column);
            `"none"` leaves the inner products undivided.
        direction_fn: optional function giving the update directions from the per-task
            gradients (see `DirectionFn`); it replaces the built-in SGD / Adam rules.
        scaler: the `torch.amp.GradScaler` of a mixed-precision loop. With it,
            `backward` scales the summed loss exactly as `scaler.scale(sum(losses))
            .backward()` would, the per-task gradients are unscaled before they are
            stored, and a step the scaler skips (overflow) is counted in
            `skipped_steps` and never scored. The tracker notices a skipped step when the
            scaler's scale has changed at the next `backward` while no optimizer step has
            happened, which `GradScaler.update()` guarantees after an overflow.
        distributed: how the score is formed when `torch.distributed` is initialised with
            more than one rank. `"replicated"` (what `"auto"` picks): every rank holds all
            shared parameters (DistributedDataParallel); the per-task gradients and losses
            are averaged over ranks before scoring, so the score is that of the global
            gradients and identical on every rank. Cost per measured step: one
            all-reduce of `T * n_shared + T` numbers (`n_shared` shared elements).
            `"sharded"`: each rank passes a disjoint part of the shared parameters whose
            per-task gradients are already global (e.g. sharded parameters); each rank
            forms its partial `T x T` matrix and one all-reduce of `T * T + T` numbers
            completes it. `"none"` scores the local gradients of each rank.
        process_group: the process group of the all-reduce (default: the world).
        batched: take the per-task gradients in one batched backward (`True`), one
            backward per task (`False`), or try batched and fall back for good on the
            first failure (`None`).

    Cost of a measured step: one backward per task through the graph of the shared
    parameters (or one batched backward), the fused score, and `T` copies of the shared
    parameters' gradients held until the optimizer step. Steps that are not measured cost
    nothing beyond `sum(losses).backward()`.

    Read-outs (on the CPU): `affinity` (float64 mean per entry over the valid measured
    steps; NaN where no step was valid), `stderr`, `counts` and `missing` (int64),
    `measured_steps`, `skipped_steps` (measured steps the scaler skipped).

    Example:
        >>> import torch
        >>> from etap_torch import AffinityTracker
        >>> w = torch.zeros((), requires_grad=True)
        >>> optimizer = torch.optim.SGD([w], lr=0.1)
        >>> tracker = AffinityTracker([w], optimizer)
        >>> tracker.backward([(w - 1) ** 2, (w + 1) ** 2])
        >>> optimizer.step()
        >>> tracker.affinity
        tensor([[ 4., -4.],
                [-4.,  4.]], dtype=torch.float64)
    """

    def __init__(
        self,
        shared_params: Iterable[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        every: int = 1,
        normalize: Literal["loss", "none"] = "loss",
        direction_fn: DirectionFn | None = None,
        scaler: torch.amp.GradScaler | None = None,
        distributed: Literal["auto", "replicated", "sharded", "none"] = "auto",
        process_group: Any = None,
        batched: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                _error("optimizer", "be a torch.optim.Optimizer", f"{type(optimizer).__name__}")
            )
        self._params = self._check_params(shared_params, optimizer)
        self._family = self._optimizer_family(optimizer, direction_fn)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(_error("every", "be a positive integer", repr(every)))
        if normalize not in ("loss", "none"):
            raise ValueError(_error("normalize", 'be "loss" or "none"', repr(normalize)))
        if distributed not in ("auto", "replicated", "sharded", "none"):
            raise ValueError(
                _error(
                    "distributed",
                    'be "auto", "replicated", "sharded" or "none"',
                    repr(distributed),
                )
            )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                _error("scaler", "be a torch.amp.GradScaler", f"{type(scaler).__name__}")
            )

        self.optimizer = optimizer
        self.every = every
        self.normalize = normalize
        self.direction_fn = direction_fn
        self.scaler = scaler
        self.distributed = distributed
        self.process_group = process_group
        self._batched = batched

        self.task_names: list[str] | None = None
        self.num_tasks: int | None = None
        self._steps = 0
        self._pending: dict[str, Any] | None = None
        self._clear_statistics()
        self._handles = [optimizer.register_step_pre_hook(self._on_step)]

    # ---- construction checks -------------------------------------------------------------

    @staticmethod
    def _check_params(
        shared_params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer
    ) -> list[torch.Tensor]:
        if isinstance(shared_params, torch.Tensor):
            shared_params = [shared_params]
        params = list(shared_params)
        if not params:
            raise ValueError(
                _error("shared_params", "contain at least one parameter", "an empty collection")
            )
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        seen: dict[int, int] = {}
        for index, param in enumerate(params):
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    _error(
                        "shared_params",
                        "contain tensors",
                        f"a {type(param).__name__} at position {index}",
                    )
                )
            if not param.requires_grad:
                raise ValueError(
                    _error(
                        "shared_params",
                        "contain parameters that require a gradient",
                        f"position {index} (shape {list(param.shape)}) with requires_grad=False",
                    )
                )
            if id(param) in seen:
                raise ValueError(
                    _error(
                        "shared_params",
                        "name every parameter once",
                        f"the same parameter at positions {seen[id(param)]} and {index}",
                    )
                )
            seen[id(param)] = index
            if id(param) not in owned:
                raise ValueError(
                    _error(
                        "shared_params",
                        "contain only parameters that `optimizer` updates",
                        f"position {index} (shape {list(param.shape)}) in none of its "
                        "parameter groups",
                    )
                )
            if param.is_complex() or param.is_sparse:
                # TODO(complex): complex and sparse parameters need their own direction rules.
                raise ValueError(
                    _error(
                        "shared_params",
                        "contain dense real parameters",
                        f"position {index} of dtype {param.dtype} and layout {param.layout}",
                    )
                )
        return params

    @staticmethod
    def _optimizer_family(
        optimizer: torch.optim.Optimizer, direction_fn: DirectionFn | None
    ) -> Literal["sgd", "adam", "custom"]:
        if direction_fn is not None:
            if not callable(direction_fn):
                raise TypeError(
                    _error("direction_fn", "be callable", f"{type(direction_fn).__name__}")
                )
            return "custom"
        if type(optimizer) is torch.optim.SGD:
            return "sgd"
        if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
            return "adam"
        raise TypeError(
            _error(
                "optimizer",
                "be torch.optim.SGD, Adam or AdamW, or come with `direction_fn` giving its "
                "update directions",
                f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            )
        )

    # ---- the backward pass ---------------------------------------------------------------

    def backward(self, losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> None:
        """Back-propagates `sum(losses)` and, on a measured step, keeps the per-task gradients.

        Args:
            losses: the `T` per-task losses, each a scalar tensor, as a sequence or as a dict
                (its keys become `task_names`; the order of the first call is kept).

        Every parameter's `.grad` ends exactly as `sum(losses).backward()` (with a
        `scaler`: `scaler.scale(sum(losses)).backward()`) leaves it. Between two optimizer
        steps the per-task gradients and losses of all calls are summed (gradient
        accumulation).
        """
        loss_list = self._check_losses(losses)
        grad_scale = None
        if self.scaler is not None and self.scaler.is_enabled():
            grad_scale = self.scaler.scale(torch.ones((), device=loss_list[0].device))
        self._drop_window_if_step_skipped(grad_scale)

        measuring = bool(self._handles) and self._steps % self.every == 0
        if measuring:
            self._capture(loss_list, grad_scale)

        total = sum(loss_list)
        if grad_scale is not None:
            total = self.scaler.scale(total)
        total.backward()

    def _check_losses(
        self, losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        if isinstance(losses, Mapping):
            names = [str(name) for name in losses]
            loss_list = list(losses.values())
            if self.task_names is None:
                self.task_names = names
            elif names != self.task_names:
                raise ValueError(
                    _error(
                        "losses",
                        f"have the keys {self.task_names} of the first call, in that order",
                        f"{names}",
                    )
                )
        elif isinstance(losses, torch.Tensor):
            raise TypeError(
                _error(
                    "losses",
                    "be a sequence or dict of scalar tensors, one per task",
                    f"a single tensor of shape {list(losses.shape)}",
                )
            )
        else:
            loss_list = list(losses)

        if not loss_list:
            raise ValueError(_error("losses", "contain one loss per task", "no loss"))
        if self.num_tasks is not None and len(loss_list) != self.num_tasks:
            raise ValueError(
                _error(
                    "losses",
                    f"contain {self.num_tasks} losses, one per task as in the first call",
                    f"{len(loss_list)}",
                )
            )
        for index, loss in enumerate(loss_list):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                found = (
                    f"shape {list(loss.shape)}"
                    if isinstance(loss, torch.Tensor)
                    else type(loss).__name__
                )
                raise ValueError(
                    _error("losses", "contain scalar tensors", f"{found} at position {index}")
                )
        self.num_tasks = len(loss_list)
        return [loss.reshape(()) for loss in loss_list]

    def _drop_window_if_step_skipped(self, grad_scale: torch.Tensor | None) -> None:
        pending = self._pending
        if pending is None or pending["scale"] is None or grad_scale is None:
            return
        # TODO(scaler-sync): reading the scale waits for the device once per measured
        # backward; comparing on the device and resolving at the step would avoid it.
        if float(grad_scale) != pending["scale"]:
            self._pending = None
            self.skipped_steps += 1

    def _capture(self, losses: list[torch.Tensor], grad_scale: torch.Tensor | None) -> None:
        loss_values = torch.stack([loss.detach().to(torch.float64) for loss in losses])
        all_finite = bool(torch.isfinite(loss_values).all())
        # A batched backward sends zeros through every task's graph, and 0 * inf poisons the
        # other tasks' gradients; one backward per task keeps them clean.
        per_task_grads = self._per_task_grads(losses, grad_scale, batched=all_finite)
        if grad_scale is not None:
            inverse_scale = grad_scale.double().reciprocal().float()
            per_task_grads = [grad * inverse_scale.to(grad.device) for grad in per_task_grads]
        if not all_finite:
            bad = [i for i in range(len(losses)) if not math.isfinite(float(loss_values[i]))]
            warnings.warn(
                f"Parameter `losses` should be finite. Found non-finite losses for tasks {bad}; "
                "their columns of this step are counted as missing.",
                RuntimeWarning,
                stacklevel=3,
            )

        pending = self._pending
        if pending is None:
            self._pending = {
                "grads": per_task_grads,
                "losses": loss_values,
                "scale": None if grad_scale is None else float(grad_scale),
            }
            return
        for stored, new in zip(pending["grads"], per_task_grads, strict=True):
            stored.add_(new)
        pending["losses"] += loss_values

    def _per_task_grads(
        self, losses: list[torch.Tensor], grad_scale: torch.Tensor | None, batched: bool
    ) -> list[torch.Tensor]:
        """Per shared parameter k, the stack [T, *shape_k] of the per-task gradients."""
        num_tasks = len(losses)
        scale = torch.ones((), device=losses[0].device) if grad_scale is None else grad_scale
        with_graph = [t for t, loss in enumerate(losses) if loss.requires_grad]
        stacks = [
            torch.zeros((num_tasks, *p.shape), dtype=p.dtype, device=p.device) for p in self._params
        ]
        if not with_graph:
            return stacks

        rows: list[torch.Tensor] | None = None
        if batched and self._batched is not False:
            rows = self._batched_grads([losses[t] for t in with_graph], scale)
        if rows is None:
            rows = self._looped_grads([losses[t] for t in with_graph], scale)
        for stack, row in zip(stacks, rows, strict=True):
            stack[with_graph] = row.to(stack.dtype)
        return stacks

    def _batched_grads(
        self, losses: list[torch.Tensor], scale: torch.Tensor
    ) -> list[torch.Tensor] | None:
        stacked = torch.stack(losses)
        grad_outputs = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
        grad_outputs = grad_outputs * scale.to(stacked.dtype)
        try:
            return list(
                torch.autograd.grad(
                    stacked,
                    self._params,
                    grad_outputs=grad_outputs,
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                    is_grads_batched=True,
                )
            )
        except RuntimeError as error:
            if self._batched:
                raise
            self._batched = False
            warnings.warn(
                "A batched backward is not supported by this model "
                f"({str(error).splitlines()[0]}); the tracker takes one backward per task.",
                UserWarning,
                stacklevel=4,
            )
            return None

    def _looped_grads(self, losses: list[torch.Tensor], scale: torch.Tensor) -> list[torch.Tensor]:
        per_task = [
            torch.autograd.grad(
                loss,
                self._params,
                grad_outputs=scale.to(loss.dtype),
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for loss in losses
        ]
        return [torch.stack(column) for column in zip(*per_task, strict=True)]

    # ---- scoring -------------------------------------------------------------------------

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        pending, self._pending = self._pending, None
        self._steps += 1
        if pending is None:
            return
        grads, losses = pending["grads"], pending["losses"]
        mode = self._distributed_mode()
        if mode == "replicated":
            grads, losses = self._average_over_ranks(grads, losses)
        elif mode == "sharded":
            # TODO(fsdp): tested with ranks that each pass a disjoint part of the parameters
            # with global gradients; FullyShardedDataParallel's flat shards are not wired in.
            losses = self._average_losses(losses)

        # The kernels accumulate in float64 only when an input is float64; the losses follow
        # the gradients so float32 training keeps float32 kernels.
        any_double = any(grad.dtype == torch.float64 for grad in grads)
        losses = losses.to(grads[0].device, torch.float64 if any_double else torch.float32)
        valid_columns = torch.isfinite(losses)
        if self.normalize == "loss":
            valid_columns &= losses > 0
        op_losses = losses if self.normalize == "loss" else torch.ones_like(losses)
        if mode == "sharded":
            numerator = self._score(grads, torch.ones_like(losses)).to(torch.float64)
            dist.all_reduce(numerator, group=self.process_group)
            safe = torch.where(valid_columns, op_losses, torch.ones_like(op_losses))
            step_affinity = numerator / safe.to(numerator)[None, :]
        else:
            step_affinity = self._score(grads, op_losses)

        step_affinity = step_affinity.detach().to("cpu", torch.float64)
        valid = valid_columns.cpu()[None, :] & torch.isfinite(step_affinity)
        self._record(step_affinity, valid)

    def _distributed_mode(self) -> str:
        if self.distributed == "none":
            return "none"
        initialised = dist.is_available() and dist.is_initialized()
        if not initialised or dist.get_world_size(self.process_group) == 1:
            return "none"
        return "replicated" if self.distributed == "auto" else self.distributed

    def _average_over_ranks(
        self, grads: list[torch.Tensor], losses: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        world_size = dist.get_world_size(self.process_group)
        flat = torch.cat([grad.reshape(grad.shape[0], -1) for grad in grads], dim=1)
        dist.all_reduce(flat, group=self.process_group)
        flat /= world_size
        sizes = [grad[0].numel() for grad in grads]
        averaged = [
            part.reshape(grad.shape)
            for part, grad in zip(flat.split(sizes, dim=1), grads, strict=True)
        ]
        return averaged, self._average_losses(losses)

    def _average_losses(self, losses: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size(self.process_group)
        losses = losses.clone()
        dist.all_reduce(losses, group=self.process_group)
        return losses / world_size

    def _score(self, grads: list[torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
        """The step's [T, T] matrix through the fused operator of the optimizer family."""
        if self._family == "custom":
            directions = list(self.direction_fn(grads))
            return torch.ops.etap.affinity(grads, directions, losses)
        groups = self._groups_of_params()
        if self._family == "sgd":
            scales, offsets = sgd_scales_and_offsets(self.optimizer, self._params, groups)
            return torch.ops.etap.affinity_sgd(grads, scales, offsets, losses)
        arguments = adam_arguments(self.optimizer, self._params, groups)
        params = [param.detach() for param in self._params]
        return torch.ops.etap.affinity_adam(grads, params, *arguments, losses)

    def _groups_of_params(self) -> list[dict[str, Any]]:
        group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        groups = []
        for index, param in enumerate(self._params):
            if id(param) not in group_of:
                raise RuntimeError(
                    _error(
                        "shared_params",
                        "stay in the optimizer's parameter groups",
                        f"position {index} removed from them after construction",
                    )
                )
            groups.append(group_of[id(param)])
        return groups

    # ---- aggregation ---------------------------------------------------------------------

    def _clear_statistics(self) -> None:
        self._count: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self.measured_steps = 0
        self.skipped_steps = 0

    def _record(self, step_affinity: torch.Tensor, valid: torch.Tensor) -> None:
        if self._count is None:
            shape = step_affinity.shape
            self._count = torch.zeros(shape, dtype=torch.int64)
            self._mean = torch.zeros(shape, dtype=torch.float64)
            self._m2 = torch.zeros(shape, dtype=torch.float64)
        self.measured_steps += 1
        self._count += valid.to(torch.int64)
        count = self._count.clamp(min=1).to(torch.float64)
        delta = torch.where(valid, step_affinity - self._mean, torch.zeros_like(self._mean))
        self._mean += delta / count
        self._m2 += delta * torch.where(valid, step_affinity - self._mean, 0.0)

    @property
    def counts(self) -> torch.Tensor:
        """[T, T] int64: the number of measured steps at which each entry was valid."""
        if self._count is None:
            return torch.zeros(0, 0, dtype=torch.int64)
        return self._count.clone()

    @property
    def affinity(self) -> torch.Tensor:
        """[T, T] float64: mean of A[source, target] over the valid measured steps (NaN if none)."""
        if self._mean is None:
            return torch.zeros(0, 0, dtype=torch.float64)
        return torch.where(self._count > 0, self._mean, math.nan)

    @property
    def stderr(self) -> torch.Tensor:
        """[T, T] float64: standard error of `affinity` per entry (NaN below two valid steps)."""
        if self._m2 is None:
            return torch.zeros(0, 0, dtype=torch.float64)
        count = self._count.to(torch.float64)
        variance = self._m2 / (count - 1).clamp(min=1)
        return torch.where(self._count > 1, (variance / count).sqrt(), math.nan)

    @property
    def missing(self) -> torch.Tensor:
        """[T, T] int64: measured steps at which an entry was not valid (a bad target loss,
        a non-finite gradient, or a step the scaler skipped), never folded in as zeros."""
        if self._count is None:
            return torch.zeros(0, 0, dtype=torch.int64)
        return self.measured_steps + self.skipped_steps - self._count

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps seen since construction (or `load_state_dict`), skipped ones included."""
        return self._steps

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The statistics and the step counter; save it between optimizer steps."""
        return {
            "version": _STATE_VERSION,
            "every": self.every,
            "normalize": self.normalize,
            "steps": self._steps,
            "measured_steps": self.measured_steps,
            "skipped_steps": self.skipped_steps,
            "num_tasks": self.num_tasks,
            "task_names": None if self.task_names is None else list(self.task_names),
            "count": None if self._count is None else self._count.clone(),
            "mean": None if self._mean is None else self._mean.clone(),
            "m2": None if self._m2 is None else self._m2.clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores what `state_dict` saved; measurement resumes exactly where it stopped."""
        expected = set(self.state_dict())
        if set(state_dict) != expected or state_dict["version"] != _STATE_VERSION:
            raise ValueError(
                _error(
                    "state_dict",
                    f"come from AffinityTracker.state_dict (version {_STATE_VERSION}, keys "
                    f"{sorted(expected)})",
                    f"keys {sorted(state_dict)}",
                )
            )
        tensors = [state_dict[key] for key in ("count", "mean", "m2")]
        num_tasks = state_dict["num_tasks"]
        if any(t is not None and tuple(t.shape) != (num_tasks, num_tasks) for t in tensors):
            raise ValueError(
                _error(
                    "state_dict",
                    f"hold [{num_tasks}, {num_tasks}] statistics",
                    f"shapes {[None if t is None else list(t.shape) for t in tensors]}",
                )
            )
        count, mean, m2 = tensors
        if count is not None and (
            count.is_floating_point() or count.is_complex() or bool((count < 0).any())
        ):
            raise ValueError(
                _error("state_dict", "hold non-negative integer counts", f"count {count}")
            )
        for key, values in (("mean", mean), ("m2", m2)):
            if count is None or values is None:
                continue
            if not bool(torch.isfinite(values[count > 0]).all()):
                raise ValueError(
                    _error("state_dict", f"hold a finite `{key}` where counts are positive", values)
                )
        self.every = int(state_dict["every"])
        self.normalize = state_dict["normalize"]
        self._steps = int(state_dict["steps"])
        self.measured_steps = int(state_dict["measured_steps"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.num_tasks = num_tasks
        self.task_names = state_dict["task_names"]
        self._count = None if count is None else count.to(torch.int64).clone()
        self._mean = None if mean is None else mean.to(torch.float64).clone()
        self._m2 = None if m2 is None else m2.to(torch.float64).clone()
        self._pending = None

    def reset(self) -> None:
        """Forgets every measurement and the gradients gathered since the last step.

        The optimizer step counter (the phase of `every`) is kept.
        """
        self._clear_statistics()
        self._pending = None

    def remove(self) -> None:
        """Detaches the optimizer hook; `backward` then only back-propagates the sum."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = None

    def __enter__(self) -> AffinityTracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


# ---- the optimizer families -------------------------------------------------------------


def sgd_scales_and_offsets(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    groups: Sequence[Mapping[str, Any]],
) -> tuple[list[float], list[torch.Tensor | None]]:
    """Writes torch.optim.SGD's direction for each parameter as `a_k * g + c_k`.

    With `h = (-g if maximize else g) + wd * p`, SGD moves by `lr` times
    `h` (no momentum), `h` (momentum, first step, no buffer yet), `(1 + mu) * h`
    (the same with Nesterov), `mu * buf + (1 - tau) * h` (momentum with a buffer) or
    `(1 + mu * (1 - tau)) * h + mu^2 * buf` (the same with Nesterov).

    Returns:
        scales: `a_k` per parameter.
        offsets: `c_k` per parameter, shaped like it (None where zero).
    """
    scales: list[float] = []
    offsets: list[torch.Tensor | None] = []
    for param, group in zip(params, groups, strict=True):
        momentum = _scalar(group["momentum"])
        dampening = _scalar(group["dampening"])
        weight_decay = _scalar(group["weight_decay"])
        sign = -1.0 if group["maximize"] else 1.0
        buffer = optimizer.state.get(param, {}).get("momentum_buffer") if momentum else None

        if momentum == 0:
            gain, buffer_gain = 1.0, 0.0
        elif buffer is None:
            gain, buffer_gain = (1.0 + momentum if group["nesterov"] else 1.0), 0.0
        elif group["nesterov"]:
            gain, buffer_gain = 1.0 + momentum * (1.0 - dampening), momentum * momentum
        else:
            gain, buffer_gain = 1.0 - dampening, momentum

        offset = None
        if weight_decay != 0:
            offset = (gain * weight_decay) * param.detach()
        if buffer_gain != 0:
            scaled_buffer = buffer_gain * buffer.detach()
            offset = scaled_buffer if offset is None else offset + scaled_buffer
        scales.append(sign * gain)
        offsets.append(offset)
    return scales, offsets


def adam_arguments(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    groups: Sequence[Mapping[str, Any]],
) -> tuple[list[Any], ...]:
    """The per-parameter lists `etap::affinity_adam` takes after `grads` and `params`.

    Reads torch.optim.Adam / AdamW's state before the step (None where the state is fresh)
    and each parameter's group: betas, eps, weight decay, the step count, whether decay is
    decoupled (AdamW), amsgrad and maximize.
    """
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = [], [], []
    beta1, beta2, eps, weight_decay, step = [], [], [], [], []
    decoupled, amsgrad, maximize = [], [], []
    for param, group in zip(params, groups, strict=True):
        state = optimizer.state.get(param, {})
        exp_avgs.append(state.get("exp_avg"))
        exp_avg_sqs.append(state.get("exp_avg_sq"))
        max_exp_avg_sqs.append(state.get("max_exp_avg_sq") if group["amsgrad"] else None)
        beta1.append(_scalar(group["betas"][0]))
        beta2.append(_scalar(group["betas"][1]))
        eps.append(_scalar(group["eps"]))
        weight_decay.append(_scalar(group["weight_decay"]))
        step.append(_scalar(state["step"]) if "step" in state else 0.0)
        decoupled.append(bool(group.get("decoupled_weight_decay", False)))
        amsgrad.append(bool(group["amsgrad"]))
        maximize.append(bool(group["maximize"]))
    return (
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
