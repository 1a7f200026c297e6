"""Group selection: our exact search against a plain exhaustive Python search.

Every group of two or more tasks is a candidate (plus the singletons, gain 0). Gains mimic
predicted ones: mostly small, many negative, driven by a random affinity matrix. For each case
the exhaustive search runs first when it can finish within a minute (a short probe projects its
time; beyond a minute it is skipped and its projected time is shown); our result must match it
before anything is timed. The heuristic's gap to the exact optimum is reported beside.

    nice -n 5 python benchmarks/grouping.py   (from the repository root, after the build)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from etap_torch import all_groups, select_groups

EXHAUSTIVE_LIMIT_S = 60.0
PROBE_S = 3.0


class _OutOfTime(Exception):
    def __init__(self, fraction_done: float) -> None:
        super().__init__(fraction_done)
        self.fraction_done = fraction_done


def realistic_gains(groups: torch.Tensor, seed: int) -> torch.Tensor:
    """gain(S, t) = 0.8 * mean of A[s, t] over the other members + a size cost + noise."""
    generator = torch.Generator().manual_seed(seed)
    num_tasks = groups.shape[1]
    affinity = torch.randn((num_tasks, num_tasks), generator=generator, dtype=torch.float64)
    affinity = affinity * 0.05 - 0.01
    members = groups.double()
    others = members.sum(dim=1, keepdim=True) - 1
    mean_onto = (members @ affinity - members * affinity.diagonal()) / others
    noise = torch.randn(groups.shape, generator=generator, dtype=torch.float64) * 0.02
    size_cost = 0.005 * (others - 1)
    return (0.8 * mean_onto - size_cost + noise) * members


# Stands for "not a member": low enough that any sum holding it is below every real sum.
_ABSENT = -1e300


def _candidate_table(groups: torch.Tensor, gains: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    num_tasks = groups.shape[1]
    lone = np.eye(num_tasks, dtype=bool)
    members = np.concatenate([groups.numpy(), lone])
    table = np.concatenate([gains.numpy(), np.zeros((num_tasks, num_tasks))])
    return members, np.where(members, table, _ABSENT)


def exhaustive_cover(groups, gains, max_groups, time_limit):
    """Every selection of at most ``max_groups`` candidates; the last pick is vectorised."""
    table = _candidate_table(groups, gains)[1]
    count, num_tasks = table.shape
    prefixes_total = sum(math.comb(count, k - 1) for k in range(1, max_groups + 1))
    state = {"value": -math.inf, "chosen": None, "prefixes": 0}
    deadline = time.perf_counter() + time_limit
    scratch = np.empty_like(table)
    totals_scratch = np.empty(count)

    def extend(start: int, served: np.ndarray, prefix: list[int]) -> None:
        state["prefixes"] += 1
        if state["prefixes"] % 256 == 0 and time.perf_counter() > deadline:
            raise _OutOfTime(state["prefixes"] / prefixes_total)
        if start < count:
            rest = count - start
            np.maximum(served, table[start:], out=scratch[:rest])
            totals = scratch[:rest].sum(axis=1, out=totals_scratch[:rest])
            last = int(np.argmax(totals))
            if totals[last] > max(state["value"], _ABSENT / 2):
                state["value"], state["chosen"] = float(totals[last]), [*prefix, start + last]
        if len(prefix) + 1 < max_groups:
            for j in range(start, count):
                prefix.append(j)
                extend(j + 1, np.maximum(served, table[j]), prefix)
                prefix.pop()

    extend(0, np.full(num_tasks, _ABSENT), [])
    return state["chosen"], state["value"] / num_tasks


def exhaustive_partition(groups, gains, max_groups, time_limit):
    """Every partition of the tasks into at most ``max_groups`` candidate groups."""
    members, table = _candidate_table(groups, gains)
    num_tasks = table.shape[1]
    value_of = {}
    for index, row in enumerate(members):
        mask = int(sum(1 << t for t in np.flatnonzero(row)))
        value = float(np.where(row, table[index], 0.0).sum())
        if mask not in value_of or value > value_of[mask][0]:
            value_of[mask] = (value, index)
    # Progress: the first blocks (those holding task 0) done, each weighted by the work left for
    # the rest, about base^(tasks left); the weights sum to (1 + base)^(T - 1).
    base = min(max_groups, 3) if max_groups > 1 else 0
    total_weight = (1 + base) ** (num_tasks - 1)
    state = {"best": -math.inf, "chosen": None, "done_weight": 0}
    deadline = time.perf_counter() + time_limit
    full = (1 << num_tasks) - 1

    def place(placed: int, value: float, chosen: list[int]) -> None:
        if placed == full:
            if value > state["best"]:
                state["best"], state["chosen"] = value, list(chosen)
            return
        if len(chosen) == max_groups:
            return
        low = (~placed & full) & -(~placed & full)
        free = full & ~placed & ~low
        sub = free
        while True:
            block = sub | low
            if block in value_of:
                block_value, index = value_of[block]
                chosen.append(index)
                place(placed | block, value + block_value, chosen)
                chosen.pop()
            if not chosen:
                state["done_weight"] += base ** (num_tasks - bin(block).count("1"))
                if time.perf_counter() > deadline:
                    raise _OutOfTime(state["done_weight"] / total_weight)
            if sub == 0:
                break
            sub = (sub - 1) & free

    place(0, 0.0, [])
    return state["chosen"], state["best"] / num_tasks


def run_exhaustive(mode, groups, gains, max_groups):
    """(chosen, objective, seconds) or (None, None, projected seconds) when over the limit."""
    search = exhaustive_cover if mode == "cover" else exhaustive_partition
    start = time.perf_counter()
    try:
        chosen, objective = search(groups, gains, max_groups, PROBE_S)
    except _OutOfTime as probe:
        projected = PROBE_S / max(probe.fraction_done, 1e-12)
        if projected > EXHAUSTIVE_LIMIT_S:
            return None, None, projected
        start = time.perf_counter()
        chosen, objective = search(groups, gains, max_groups, math.inf)
    return sorted(chosen), objective, time.perf_counter() - start


def timed(function, repeats: int):
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    cases = [(10, b) for b in (2, 3, 4)] + [(t, 3) for t in (12, 14, 16)]
    header = (
        f"{'T':>3} {'B':>2} {'mode':>9} {'cands':>6} {'ours s':>8} {'exhaustive s':>20} "
        f"{'speed-up':>9} {'check':>11} {'heur. gap':>10} {'objective':>10}"
    )
    print(header)
    print("-" * len(header))
    for num_tasks, max_groups in cases:
        groups = all_groups(num_tasks)
        gains = realistic_gains(groups, args.seed + num_tasks)
        for mode in ("cover", "partition"):
            expected, expected_objective, exhaustive_s = run_exhaustive(
                mode, groups, gains, max_groups
            )
            repeats = 3 if num_tasks <= 12 else 1

            def ours(groups=groups, gains=gains, max_groups=max_groups, mode=mode):
                return select_groups(groups, gains, max_groups=max_groups, mode=mode)

            result, ours_s = timed(ours, repeats)
            assert result.exact, "the exact search reported a non-exact answer"
            if expected is not None:
                assert result.chosen == expected, (result.chosen, expected)
                assert abs(result.objective - expected_objective) < 1e-12
                check = "matches"
                exhaustive = f"{exhaustive_s:.3f}"
                speed_up = f"{exhaustive_s / ours_s:.0f}x"
            else:
                check = "-"
                if mode == "cover" and num_tasks <= 10 and max_groups <= 3:
                    # A different exact search of ours: branch and bound over selections.
                    other = select_groups(
                        groups, gains, max_groups=max_groups, method="branch_and_bound"
                    )
                    assert (other.chosen, other.objective) == (result.chosen, result.objective)
                    check = "B&B agrees"
                exhaustive = f"skipped (~{exhaustive_s:.0f})"
                speed_up = f">{EXHAUSTIVE_LIMIT_S / ours_s:.0f}x"
            heuristic = select_groups(
                groups, gains, max_groups=max_groups, mode=mode, method="heuristic"
            )
            assert heuristic.objective <= result.objective + 1e-15
            gap = result.objective - heuristic.objective
            print(
                f"{num_tasks:>3} {max_groups:>2} {mode:>9} {len(groups) + num_tasks:>6} "
                f"{ours_s:>8.3f} {exhaustive:>20} {speed_up:>9} {check:>11} {gap:>10.2e} "
                f"{result.objective:>10.5f}",
                flush=True,
            )
    print(
        "cands: candidates incl. singletons; exhaustive: plain Python search, skipped past "
        f"{EXHAUSTIVE_LIMIT_S:.0f} s (projected seconds in brackets); "
        "speed-up = exhaustive / ours; heur. gap = exact minus heuristic objective."
    )


if __name__ == "__main__":
    main()
