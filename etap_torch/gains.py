"""Turn per-task losses of trained groups into the gain table of learning together."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def gains_from_losses(groups: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The gain of every member of every group over its single-task model.

    ``gain(S, t) = (L_t({t}) - L_t(S)) / L_t({t})``; positive means the group helps ``t``.

    Args:
        groups: ``[N, T]`` bool membership; for every task used by some group the single-task
            group ``{t}`` must be one of the rows.
        losses: ``[..., N, T]`` held-out loss of each member (entries off the membership are
            ignored); leading dimensions (for example seeds) are kept.

    Returns:
        ``[..., N, T]`` float64 gains, exactly 0 off the membership and for single-task rows.
    """
    groups = torch.as_tensor(groups).bool()
    losses = torch.as_tensor(losses)
    if groups.dim() != 2:
        raise ValueError(
            f"Parameter `groups` should be a [N, T] membership matrix. Found shape "
            f"{tuple(groups.shape)}."
        )
    if losses.shape[-2:] != groups.shape:
        raise ValueError(
            f"Parameter `losses` should end with the shape of `groups` {tuple(groups.shape)}. "
            f"Found {tuple(losses.shape)}."
        )
    losses = losses.to(torch.float64)
    sizes = groups.sum(dim=1)
    single_rows = torch.full((groups.shape[1],), -1, dtype=torch.long)
    for row in (sizes == 1).nonzero().squeeze(1).tolist():
        single_rows[int(groups[row].nonzero())] = row
    used = groups.any(dim=0)
    missing = (used & (single_rows < 0)).nonzero().squeeze(1).tolist()
    if missing:
        raise ValueError(
            "Parameter `groups` should contain the single-task group of every task it uses. "
            f"Found none for tasks {missing}."
        )

    task_index = torch.arange(groups.shape[1])
    single_losses = losses[..., single_rows.clamp(min=0), task_index]  # [..., T]
    member_losses = losses.masked_fill(~groups, 0.0)
    member_single = single_losses.unsqueeze(-2).expand_as(losses)
    bad = groups & ~(torch.isfinite(member_single) & (member_single > 0))
    if bool(bad.any()):
        raise ValueError(
            "Parameter `losses` should hold a positive, finite single-task loss for every task "
            "used. Found a non-positive or non-finite one."
        )
    gains = (member_single - member_losses) / member_single
    return gains.masked_fill(~groups, 0.0)


def noise_ceiling(groups: torch.Tensor, gains: torch.Tensor) -> dict[str, float]:
    """How well gains measured with one seed agree with other seeds.

    Over the member entries of every group of two or more tasks:
    ``pairwise``: Pearson correlation between two seeds, averaged over seed pairs;
    ``one_vs_rest``: Pearson correlation of one seed with the mean of the other seeds, averaged
    over the held-out seed.

    Args:
        groups: ``[N, T]`` bool membership.
        gains: ``[seeds, N, T]`` (at least two seeds).
    """
    groups = torch.as_tensor(groups).bool()
    gains = torch.as_tensor(gains, dtype=torch.float64)
    if gains.dim() != 3 or gains.shape[0] < 2 or gains.shape[1:] != groups.shape:
        raise ValueError(
            f"Parameter `gains` should be [seeds >= 2, {groups.shape[0]}, {groups.shape[1]}]. "
            f"Found {tuple(gains.shape)}."
        )
    entries = groups & (groups.sum(dim=1, keepdim=True) >= 2)
    values = gains[:, entries].numpy()  # [seeds, entries]
    num_seeds = values.shape[0]
    pairwise = [
        np.corrcoef(values[a], values[b])[0, 1]
        for a in range(num_seeds)
        for b in range(a + 1, num_seeds)
    ]
    one_vs_rest = [
        np.corrcoef(values[a], np.delete(values, a, axis=0).mean(axis=0))[0, 1]
        for a in range(num_seeds)
    ]
    return {
        "pairwise": float(np.mean(pairwise)),
        "one_vs_rest": float(np.mean(one_vs_rest)),
        "entries": int(values.shape[1]),
    }


@dataclass
class GainTable:
    """Gains of learning together, per seed.

    Attributes:
        task_names: the ``T`` task names; task ``t`` is column ``t``.
        groups: ``[N, T]`` bool membership: the requested groups in their order, then the
            single-task groups that were added because some group used the task.
        gains: ``[seeds, N, T]`` float64 ``gain(S, t)``, 0 off the membership and for singles.
        losses: ``[seeds, N, T]`` float64 per-member losses ``L_t(S)`` the training function
            returned, 0 off the membership.
        seeds: the seeds, in the order of the first dimension.
    """

    task_names: list[str]
    groups: torch.Tensor
    gains: torch.Tensor
    losses: torch.Tensor
    seeds: list[int]

    @property
    def mean_gains(self) -> torch.Tensor:
        """``[N, T]`` gains averaged over seeds."""
        return self.gains.mean(dim=0)


def _membership(groups: object, task_names: list[str]) -> torch.Tensor:
    """Accept a ``[N, T]`` bool matrix or a list of groups given as task names or indices."""
    num_tasks = len(task_names)
    if isinstance(groups, (torch.Tensor, np.ndarray)):
        matrix = torch.as_tensor(groups)
        if matrix.dim() != 2 or matrix.shape[1] != num_tasks:
            raise ValueError(
                f"Parameter `groups` should be a [N, {num_tasks}] membership matrix. "
                f"Found shape {tuple(matrix.shape)}."
            )
        if matrix.dtype != torch.bool and not bool(((matrix == 0) | (matrix == 1)).all()):
            raise ValueError("Parameter `groups` should hold 0/1 or bool entries. Found others.")
        matrix = matrix.bool()
    else:
        position = {name: index for index, name in enumerate(task_names)}
        rows = []
        for group in groups:
            row = torch.zeros(num_tasks, dtype=torch.bool)
            for task in group:
                index = position.get(task, task) if isinstance(task, str) else task
                if not isinstance(index, (int, np.integer)) or not 0 <= index < num_tasks:
                    raise ValueError(
                        f"Parameter `groups` should name tasks of `tasks` or indices in "
                        f"[0, {num_tasks}). Found {task!r}."
                    )
                row[int(index)] = True
            rows.append(row)
        matrix = torch.stack(rows) if rows else torch.zeros(0, num_tasks, dtype=torch.bool)
    if matrix.shape[0] == 0:
        raise ValueError("Parameter `groups` should hold at least one group. Found none.")
    if not bool(matrix.any(dim=1).all()):
        raise ValueError(
            "Parameter `groups` should have at least one task per group. Found an empty group."
        )
    if torch.unique(matrix, dim=0).shape[0] != matrix.shape[0]:
        raise ValueError("Parameter `groups` should list every group once. Found a repeated group.")
    return matrix


def _with_singles(groups: torch.Tensor) -> torch.Tensor:
    present = {int(row.nonzero()) for row in groups if int(row.sum()) == 1}
    missing = [t for t in groups.any(dim=0).nonzero().squeeze(1).tolist() if t not in present]
    singles = torch.zeros(len(missing), groups.shape[1], dtype=torch.bool)
    singles[torch.arange(len(missing)), missing] = True
    return torch.cat([groups, singles])


def _cache_path(cache_dir: Path, members: tuple[str, ...], seed: int) -> Path:
    digest = hashlib.sha1("\x1f".join(members).encode()).hexdigest()[:16]
    return cache_dir / f"group-{digest}-seed{seed}.json"


def _read_cached(path: Path, members: tuple[str, ...]) -> list[float] | None:
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("members") != list(members):
        raise ValueError(
            f"Parameter `cache_dir` should hold results of this task set. Found {path} for "
            f"members {record.get('members')} instead of {list(members)}."
        )
    return [float(loss) for loss in record["losses"]]


def _write_atomically(path: Path, record: dict) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        json.dump(record, stream)
    os.replace(temporary, path)


def _run_job(
    train_fn: Callable[[tuple[str, ...], int], object], members: tuple[str, ...], seed: int
) -> list[float]:
    """Train one group with one seed and return its members' losses in member order."""
    result = train_fn(members, seed)
    if isinstance(result, Mapping):
        if set(result) != set(members):
            raise ValueError(
                f"Parameter `train_fn` should return one loss per member of {list(members)}. "
                f"Found keys {sorted(result)}."
            )
        values = [result[task] for task in members]
    else:
        values = list(torch.as_tensor(result, dtype=torch.float64).reshape(-1).tolist())
        if len(values) != len(members):
            raise ValueError(
                f"Parameter `train_fn` should return {len(members)} losses for group "
                f"{list(members)}. Found {len(values)}."
            )
    losses = [float(value) for value in values]
    if not all(math.isfinite(loss) and loss > 0 for loss in losses):
        raise ValueError(
            f"Parameter `train_fn` should return positive finite losses. Found {losses} for "
            f"group {list(members)} with seed {seed}."
        )
    return losses


def collect_gains(
    train_fn: Callable[[tuple[str, ...], int], object],
    tasks: Sequence[str],
    groups: object,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> GainTable:
    """Train every requested group and every single task over seeds and return their gains.

    Each (group, seed) is one call ``train_fn(members, seed)``, where ``members`` is the tuple
    of the group's task names in task order; it returns the held-out loss of each member, as a
    sequence in that order or a mapping from task name to loss. The single-task group of every
    task used is trained too (added after the requested groups when missing), and
    ``gain(S, t) = (L_t({t}) - L_t(S)) / L_t({t})`` per seed.

    With ``cache_dir`` every finished (group, seed) is written at once, atomically, to its own
    file there; a later call with the same directory reads those results instead of training
    again, so an interrupted collection resumes where it stopped.

    Args:
        train_fn: the training function; with ``workers > 0`` it must be picklable (a function
            defined at module level) because it runs in spawned worker processes.
        tasks: the ``T`` task names, distinct.
        groups: ``[N, T]`` bool membership, or a list of groups, each a collection of task
            names or indices.
        seeds: the seeds; each group is trained once per seed.
        cache_dir: folder of the on-disk cache, created if needed; None keeps nothing.
        workers: worker processes; 0 trains in this process; None uses one per CPU core.
        progress: show a progress bar over the (group, seed) trainings still to run.

    Returns:
        :class:`GainTable`.
    """
    task_names = [str(task) for task in tasks]
    if not task_names or len(set(task_names)) != len(task_names):
        raise ValueError(f"Parameter `tasks` should list distinct task names. Found {task_names}.")
    seeds = [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"Parameter `seeds` should list distinct seeds. Found {seeds}.")
    if workers is not None and workers < 0:
        raise ValueError(f"Parameter `workers` should be 0 or more. Found {workers}.")
    membership = _with_singles(_membership(groups, task_names))
    member_names = [
        tuple(task_names[t] for t in row.nonzero().squeeze(1).tolist()) for row in membership
    ]

    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    losses = torch.zeros(len(seeds), *membership.shape, dtype=torch.float64)

    def store(row: int, seed_index: int, values: list[float]) -> None:
        losses[seed_index, row, membership[row]] = torch.tensor(values, dtype=torch.float64)

    pending = []
    for row, members in enumerate(member_names):
        for seed_index, seed in enumerate(seeds):
            cached = _read_cached(_cache_path(cache, members, seed), members) if cache else None
            if cached is not None:
                store(row, seed_index, cached)
            else:
                pending.append((row, seed_index))

    def finish(row: int, seed_index: int, values: list[float]) -> None:
        store(row, seed_index, values)
        if cache is not None:
            members, seed = member_names[row], seeds[seed_index]
            record = {"members": list(members), "seed": seed, "losses": values}
            _write_atomically(_cache_path(cache, members, seed), record)

    bar = tqdm(total=len(pending), disable=not progress, desc="training groups", unit="group")
    num_workers = (os.cpu_count() or 1) if workers is None else workers
    if num_workers == 0 or len(pending) <= 1:
        for row, seed_index in pending:
            finish(row, seed_index, _run_job(train_fn, member_names[row], seeds[seed_index]))
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
            futures = {
                pool.submit(_run_job, train_fn, member_names[row], seeds[seed_index]): (
                    row,
                    seed_index,
                )
                for row, seed_index in pending
            }
            try:
                for future in as_completed(futures):
                    finish(*futures[future], future.result())
                    bar.update()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    bar.close()

    return GainTable(
        task_names=task_names,
        groups=membership,
        gains=gains_from_losses(membership, losses),
        losses=losses,
        seeds=seeds,
    )
