"""Choosing task groups from the gain of every candidate group (algorithm.md section 7).

Two settings:

- ``mode="cover"`` (TAG's and ETAP's): groups may overlap; each task is served by the chosen
  group that gives it the highest gain; the objective is the mean over tasks of the served gain.
- ``mode="partition"``: every task sits in exactly one chosen group.

Both need every task served. A task alone (a singleton) has gain 0 by definition; singletons are
candidates, count toward ``max_groups``, and are allowed unless ``allow_singletons=False``, which
removes every one-task candidate (one-task rows of ``groups`` too). With a single task the only
grouping is that task, and it is returned whatever ``allow_singletons`` says.

The search is exact (subset dynamic programming, or branch and bound) unless the instance is too
large or ``method="heuristic"`` is asked for; the result says which (``exact``). Gains are compared
exactly on a fixed-point grid (gains below ``2**-119`` of the largest magnitude count as zero), and
among optimal selections the tie-break is: the fewest groups, then the candidate indices sorted in
descending order that come first lexicographically (the largest index as small as possible, then
the next). Candidate ``N + t`` is task ``t`` alone, so real groups win ties against singletons.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from collections.abc import Sequence
from typing import Protocol

import torch

import etap_torch._ext  # noqa: F401  (loads the operator library)

__all__ = ["SelectionResult", "all_groups", "select_from_predictor", "select_groups"]

_MODES = ("cover", "partition")
_METHODS = ("auto", "subset_dp", "branch_and_bound", "heuristic")
_MAX_ENUMERATED_TASKS = 20


@torch.library.register_fake("etap::select_groups")
def _select_groups_fake(groups, gains, max_groups, mode, allow_singletons, method):
    num_rows, num_tasks = groups.shape
    return (
        groups.new_empty((num_rows + num_tasks,), dtype=torch.bool),
        groups.new_empty((num_tasks,), dtype=torch.long),
        groups.new_empty((num_tasks,), dtype=torch.float64),
        groups.new_empty((), dtype=torch.float64),
        groups.new_empty((), dtype=torch.bool),
    )


@dataclasses.dataclass(frozen=True)
class SelectionResult:
    """The chosen groups and how they serve the tasks.

    Attributes:
        chosen: candidate indices, ascending; ``i < N`` is row ``i`` of ``groups``, ``N + t`` is
            task ``t`` alone.
        groups: ``[K, T]`` bool, the membership of each chosen group (in the order of ``chosen``).
        group_names: the task names of each chosen group.
        serving: ``[T]`` int64, for each task the position in ``chosen`` of the group serving it.
        served_gain: ``[T]`` float64, the gain each task gets from its serving group.
        objective: the mean over tasks of ``served_gain``.
        exact: whether the search proved the choice optimal.
        mode: ``"cover"`` or ``"partition"``.
        true_objective: given a ground-truth gain table, the mean over tasks of the best true gain
            among the chosen groups holding the task (each task keeps the best model it is trained
            in); otherwise ``None``.
    """

    chosen: list[int]
    groups: torch.Tensor
    group_names: list[list[str]]
    serving: torch.Tensor
    served_gain: torch.Tensor
    objective: float
    exact: bool
    mode: str
    true_objective: float | None = None


class _GainPredictor(Protocol):
    def predict_all(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def all_groups(num_tasks: int, min_size: int = 2) -> torch.Tensor:
    """Every group of at least ``min_size`` tasks, ordered by bitmask (bit ``t`` = task ``t``).

    Args:
        num_tasks: the number of tasks ``T``, from 1 to 20.
        min_size: the smallest group size kept (at least 1).

    Returns:
        ``[N, T]`` bool membership matrix; for ``T = 3`` and ``min_size = 2`` the rows are
        ``{0, 1}``, ``{0, 2}``, ``{1, 2}``, ``{0, 1, 2}``.

    Example:
        >>> all_groups(3).int().tolist()
        [[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    """
    if not 1 <= num_tasks <= _MAX_ENUMERATED_TASKS:
        raise ValueError(
            f"Parameter `num_tasks` should be between 1 and {_MAX_ENUMERATED_TASKS}. "
            f"Found {num_tasks}."
        )
    if min_size < 1:
        raise ValueError(f"Parameter `min_size` should be at least 1. Found {min_size}.")
    masks = torch.arange(1, 1 << num_tasks, dtype=torch.long)
    bits = (masks.unsqueeze(1) >> torch.arange(num_tasks)) & 1
    return bits[bits.sum(dim=1) >= min_size].bool()


def select_groups(
    groups: torch.Tensor,
    gains: torch.Tensor,
    *,
    max_groups: int,
    mode: str = "cover",
    allow_singletons: bool = True,
    task_names: Sequence[str] | None = None,
    true_gains: torch.Tensor | None = None,
    method: str = "auto",
) -> SelectionResult:
    """Choose at most ``max_groups`` groups that serve every task with the highest mean gain.

    Args:
        groups: ``[N, T]`` bool, candidate ``i`` holds task ``t`` when ``groups[i, t]``.
            ``T`` is at most 64 (tasks are bits of a 64-bit mask).
        gains: ``[N, T]`` float, the (predicted or measured) gain of each member task in each
            candidate; finite, 0 off the membership and 0 for a one-task row.
        max_groups: the most groups chosen, at least 1; more than ``T`` means ``T``.
        mode: ``"cover"`` (overlap allowed, each task served by its best chosen group) or
            ``"partition"`` (each task in exactly one chosen group).
        allow_singletons: whether a task may be served alone (gain 0).
        task_names: ``T`` names for the result; default ``"0"``, ``"1"``, ...
        true_gains: optional ``[N, T]`` ground-truth gains of the same candidates, to report the
            true objective of the choice.
        method: ``"auto"`` (exact when the instance fits: subset dynamic programming for
            ``T <= 20`` within 1 GiB of tables and about 2e10 steps, ``B * 3^T / 2`` plus one
            step per (candidate, subset of its members); else branch and bound when at most 5e7
            selections exist; else the heuristic, with a ``RuntimeWarning``), ``"subset_dp"``,
            ``"branch_and_bound"`` (always exact, may be slow) or ``"heuristic"`` (greedy start,
            group swaps, served-set moves and restarts for cover; for partition a search with a
            node budget, exact only if it finishes).

    Returns:
        A :class:`SelectionResult`.

    Raises:
        ValueError: on a non-finite gain (naming the group), a gain off the membership, an empty
            membership row, ``max_groups < 1``, too many tasks, or when no selection of at most
            ``max_groups`` candidates serves every task.

    Example:
        >>> groups = torch.tensor([[True, True, False], [False, True, True]])
        >>> gains = torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.3, -0.1]], dtype=torch.float64)
        >>> result = select_groups(groups, gains, max_groups=2)
        >>> result.chosen, round(result.objective, 4)
        ([0, 1], 0.1333)
    """
    if mode not in _MODES:
        raise ValueError(f'Parameter `mode` should be "cover" or "partition". Found {mode!r}.')
    if method not in _METHODS:
        raise ValueError(f"Parameter `method` should be one of {_METHODS}. Found {method!r}.")
    if isinstance(max_groups, bool):
        raise ValueError(f"Parameter `max_groups` should be an int. Found {max_groups!r}.")
    try:
        max_groups = operator.index(max_groups)
    except TypeError:
        raise ValueError(
            f"Parameter `max_groups` should be an int. Found {max_groups!r}."
        ) from None
    groups = torch.as_tensor(groups)
    gains = torch.as_tensor(gains)
    if groups.dim() != 2:
        raise ValueError(
            f"Parameter `groups` should be a 2-D bool matrix [N, T]. Found shape "
            f"{tuple(groups.shape)}."
        )
    num_tasks = groups.shape[1]
    names = _task_names(task_names, num_tasks)

    chosen_mask, serving, served_gain, objective, exact = torch.ops.etap.select_groups(
        groups.cpu(), gains.cpu(), max_groups, mode, allow_singletons, method
    )
    if method == "auto" and not bool(exact):
        warnings.warn(
            f"The instance ({num_tasks} tasks, {groups.shape[0]} candidates, max_groups "
            f"{max_groups}) is beyond the exact searches; the choice comes from the heuristic "
            "and may not be optimal (SelectionResult.exact is False).",
            RuntimeWarning,
            stacklevel=2,
        )
    chosen = torch.nonzero(chosen_mask).flatten().tolist()
    membership = _membership_of(chosen, groups.cpu().bool())
    position = {candidate: i for i, candidate in enumerate(chosen)}
    serving_position = torch.tensor([position[c] for c in serving.tolist()], dtype=torch.long)
    true_objective = None
    if true_gains is not None:
        true_objective = _true_objective(chosen, membership, groups, true_gains)
    return SelectionResult(
        chosen=chosen,
        groups=membership,
        group_names=[[names[t] for t in row.nonzero().flatten().tolist()] for row in membership],
        serving=serving_position,
        served_gain=served_gain,
        objective=float(objective),
        exact=bool(exact),
        mode=mode,
        true_objective=true_objective,
    )


def select_from_predictor(
    predictor: _GainPredictor,
    *,
    max_groups: int,
    mode: str = "cover",
    allow_singletons: bool = True,
    task_names: Sequence[str] | None = None,
    true_gains: torch.Tensor | None = None,
    method: str = "auto",
) -> SelectionResult:
    """Choose groups among every group a fitted predictor can score.

    Calls ``predictor.predict_all()``, which returns ``(groups [N, T] bool, gains [N, T]
    float64)`` for every group of two or more tasks in bitmask order, and passes them with the
    remaining arguments to :func:`select_groups`. ``true_gains``, if given, must follow the same
    rows (:func:`all_groups` builds that order).
    """
    groups, gains = predictor.predict_all()
    return select_groups(
        groups,
        gains,
        max_groups=max_groups,
        mode=mode,
        allow_singletons=allow_singletons,
        task_names=task_names,
        true_gains=true_gains,
        method=method,
    )


def _task_names(task_names: Sequence[str] | None, num_tasks: int) -> list[str]:
    if task_names is None:
        return [str(t) for t in range(num_tasks)]
    names = [str(name) for name in task_names]
    if len(names) != num_tasks:
        raise ValueError(
            f"Parameter `task_names` should have one name per task ({num_tasks}). "
            f"Found {len(names)}."
        )
    return names


def _membership_of(chosen: list[int], groups: torch.Tensor) -> torch.Tensor:
    num_rows, num_tasks = groups.shape
    membership = torch.zeros((len(chosen), num_tasks), dtype=torch.bool)
    for i, candidate in enumerate(chosen):
        if candidate < num_rows:
            membership[i] = groups[candidate]
        else:
            membership[i, candidate - num_rows] = True
    return membership


def _true_objective(
    chosen: list[int], membership: torch.Tensor, groups: torch.Tensor, true_gains: torch.Tensor
) -> float:
    true_gains = torch.as_tensor(true_gains, dtype=torch.float64).cpu()
    if true_gains.shape != groups.shape:
        raise ValueError(
            f"Parameter `true_gains` should have the shape of `groups` {tuple(groups.shape)}. "
            f"Found {tuple(true_gains.shape)}."
        )
    if not torch.isfinite(true_gains).all():
        rows = (~torch.isfinite(true_gains)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"Parameter `true_gains` should be finite. Found non-finite rows {rows}.")
    num_rows = groups.shape[0]
    rows = torch.zeros_like(membership, dtype=torch.float64)
    for i, candidate in enumerate(chosen):
        if candidate < num_rows:
            rows[i] = true_gains[candidate]
    served = rows.masked_fill(~membership, float("-inf")).amax(dim=0)
    return float(served.mean())
