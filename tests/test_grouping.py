"""Group selection against an exhaustive search written independently in Python."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import etap_torch
from etap_torch import SelectionResult, all_groups, select_from_predictor, select_groups

EXACT_METHODS = ("subset_dp", "branch_and_bound", "auto")


def _fixed_point(values: list[float]) -> list[int]:
    """The exact comparison grid of the selection: trunc(g * 2^(119 - E)), max |g| < 2^E."""
    largest = max((abs(v) for v in values), default=0.0)
    exponent = math.frexp(largest)[1] if largest > 0 else 0
    return [int(math.ldexp(v, 119 - exponent)) for v in values]


def brute_force(groups, gains, max_groups, mode, allow_singletons):
    """Every selection of at most ``max_groups`` candidates; returns (chosen, objective) or None.

    The winner has the highest exact served sum, then the fewest groups, then the descending
    list of candidate indices that comes first.
    """
    rows = groups.tolist()
    table = gains.double().tolist()
    num_rows, num_tasks = len(rows), len(rows[0]) if rows else groups.shape[1]
    singletons = allow_singletons or num_tasks == 1
    scaled = _fixed_point([g for row in table for g in row])
    candidates = []  # (index, members, exact scores, gains)
    for i, row in enumerate(rows):
        members = frozenset(t for t in range(num_tasks) if row[t])
        if len(members) == 1 and not singletons:
            continue
        exact = {t: scaled[i * num_tasks + t] for t in members}
        candidates.append((i, members, exact, {t: table[i][t] for t in members}))
    if singletons:
        for t in range(num_tasks):
            candidates.append((num_rows + t, frozenset([t]), {t: 0}, {t: 0.0}))

    best_key, best = None, None
    for size in range(1, min(max_groups, num_tasks) + 1):
        for combo in itertools.combinations(candidates, size):
            if mode == "partition":
                if sum(len(c[1]) for c in combo) != num_tasks:
                    continue
                if len(frozenset().union(*(c[1] for c in combo))) != num_tasks:
                    continue
            served = [
                max((c[2][t] for c in combo if t in c[1]), default=None) for t in range(num_tasks)
            ]
            if any(s is None for s in served):
                continue
            key = (-sum(served), size, sorted((c[0] for c in combo), reverse=True))
            if best_key is None or key < best_key:
                best_key, best = key, combo
    if best is None:
        return None
    served_gain = []
    for t in range(num_tasks):
        holders = sorted((c for c in best if t in c[1]), key=lambda c: (-c[3][t], c[0]))
        served_gain.append(holders[0][3][t])
    return sorted(c[0] for c in best), sum(served_gain) / num_tasks


def random_instance(rng: random.Random, num_tasks: int, with_ties: bool):
    everything = [
        [bool(mask >> t & 1) for t in range(num_tasks)]
        for mask in range(1, 1 << num_tasks)
        if bin(mask).count("1") >= 2
    ]
    num_rows = rng.randint(2, min(14, len(everything)))
    rows = [rng.choice(everything) for _ in range(num_rows)]  # duplicates on purpose
    if rng.random() < 0.3:
        lone = rng.randrange(num_tasks)
        rows.append([t == lone for t in range(num_tasks)])
    gains = []
    for row in rows:
        if sum(row) == 1:
            gains.append([0.0] * num_tasks)
        elif with_ties:
            gains.append(
                [rng.choice([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5]) if m else 0.0 for m in row]
            )
        else:
            gains.append([rng.gauss(-0.05, 0.3) if m else 0.0 for m in row])
    return torch.tensor(rows, dtype=torch.bool), torch.tensor(gains, dtype=torch.float64)


def _check_against(result: SelectionResult, expected, groups, gains, num_tasks):
    chosen, objective = expected
    assert result.chosen == chosen
    assert result.objective == objective
    assert result.exact
    assert result.served_gain.sum().item() / num_tasks == pytest.approx(objective, abs=1e-12)
    for t in range(num_tasks):
        assert result.groups[result.serving[t], t]


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("allow_singletons", [True, False])
@pytest.mark.parametrize("mode", ["cover", "partition"])
def test_matches_brute_force(mode, allow_singletons, method):
    rng = random.Random(f"{mode}-{allow_singletons}-{method}")
    checked = infeasible = 0
    for _ in range(40):
        num_tasks = rng.randint(3, 8)
        max_groups = rng.randint(1, 4)
        groups, gains = random_instance(rng, num_tasks, with_ties=rng.random() < 0.5)
        expected = brute_force(groups, gains, max_groups, mode, allow_singletons)
        if expected is None:
            with pytest.raises(ValueError, match="should allow a selection"):
                select_groups(
                    groups,
                    gains,
                    max_groups=max_groups,
                    mode=mode,
                    allow_singletons=allow_singletons,
                    method=method,
                )
            infeasible += 1
            continue
        result = select_groups(
            groups,
            gains,
            max_groups=max_groups,
            mode=mode,
            allow_singletons=allow_singletons,
            method=method,
        )
        _check_against(result, expected, groups, gains, num_tasks)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("mode", ["cover", "partition"])
def test_heuristic_is_valid_and_never_above_the_optimum(mode):
    rng = random.Random(f"heuristic-{mode}")
    gaps = []
    for _ in range(30):
        num_tasks = rng.randint(3, 8)
        max_groups = rng.randint(1, 4)
        groups, gains = random_instance(rng, num_tasks, with_ties=False)
        expected = brute_force(groups, gains, max_groups, mode, True)
        if expected is None:
            with pytest.raises(ValueError, match="should allow a selection"):
                select_groups(groups, gains, max_groups=max_groups, mode=mode, method="heuristic")
            continue
        result = select_groups(groups, gains, max_groups=max_groups, mode=mode, method="heuristic")
        assert len(result.chosen) <= max_groups
        assert result.groups.any(dim=0).all()
        if mode == "partition":
            assert (result.groups.sum(dim=0) == 1).all()
        assert result.objective <= expected[1] + 1e-12
        gaps.append(expected[1] - result.objective)
        if not result.exact:
            assert mode == "cover"
    # On instances this small the restarts reach the optimum nearly always.
    assert sum(gap < 1e-12 for gap in gaps) >= 0.8 * len(gaps)


def _abc():
    groups = torch.tensor(
        [[True, True, False], [True, False, True], [False, True, True], [True, True, True]]
    )
    gains = torch.tensor(
        [[3.0, -1.0, 0.0], [2.0, 0.0, 1.0], [0.0, -0.5, -1.0], [2.5, -0.8, 0.0]],
        dtype=torch.float64,
    )
    return groups, gains


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_pinned_three_tasks_cover(method):
    groups, gains = _abc()
    result = select_groups(
        groups,
        gains,
        max_groups=2,
        allow_singletons=False,
        task_names=["A", "B", "C"],
        method=method,
    )
    assert result.group_names == [["A", "B"], ["A", "C"]]
    assert result.served_gain.tolist() == [3.0, -1.0, 1.0]
    assert result.objective == pytest.approx(1.0, abs=1e-15)
    assert result.serving.tolist() == [0, 0, 1]
    assert brute_force(groups, gains, 2, "cover", False) == ([0, 1], 1.0)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_pinned_three_tasks_partition(method):
    groups, gains = _abc()
    result = select_groups(
        groups,
        gains,
        max_groups=2,
        mode="partition",
        allow_singletons=False,
        task_names=["A", "B", "C"],
        method=method,
    )
    assert result.group_names == [["A", "B", "C"]]
    assert result.objective == pytest.approx(1.7 / 3, abs=1e-15)


def test_true_objective_keeps_each_task_best_true_model():
    groups, gains = _abc()
    true_gains = torch.tensor(
        [[1.0, 0.5, 0.0], [2.0, 0.0, -3.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    result = select_groups(
        groups, gains, max_groups=2, allow_singletons=False, true_gains=true_gains
    )
    # Chosen {A,B} and {A,C}: A keeps max(1, 2), B 0.5, C -3.
    assert result.true_objective == pytest.approx((2.0 + 0.5 - 3.0) / 3)


@pytest.mark.parametrize("mode", ["cover", "partition"])
def test_nan_names_the_group(mode):
    groups, gains = _abc()
    gains[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"finite.*task 1 in group 2 \(tasks 1, 2\)"):
        select_groups(groups, gains, max_groups=2, mode=mode)


def test_infinite_gain_names_the_group():
    groups, gains = _abc()
    gains[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"group 3 \(tasks 0, 1, 2\)"):
        select_groups(groups, gains, max_groups=2)


@pytest.mark.parametrize("mode", ["cover", "partition"])
def test_sixteen_tasks_every_group(mode):
    groups = all_groups(16)
    generator = torch.Generator().manual_seed(5)
    gains = (torch.randn(groups.shape, generator=generator, dtype=torch.float64) * 0.1 - 0.03) * (
        groups
    )
    result = select_groups(groups, gains, max_groups=3, mode=mode)
    assert result.exact
    assert len(result.chosen) <= 3
    served = gains[result.chosen].masked_fill(~groups[result.chosen], float("-inf")).amax(dim=0)
    served = torch.where(torch.isfinite(served), served, torch.zeros_like(served))
    assert result.served_gain.tolist() == served.tolist()
    heuristic = select_groups(groups, gains, max_groups=3, mode=mode, method="heuristic")
    assert heuristic.objective <= result.objective + 1e-15


def _sparse_instance(seed: int, num_tasks: int, num_rows: int):
    generator = torch.Generator().manual_seed(seed)
    groups = torch.rand((num_rows, num_tasks), generator=generator) < 0.3
    groups[groups.sum(dim=1) < 2, :2] = True
    groups[num_rows // 2 :] = ~groups[: num_rows - num_rows // 2]  # partitions exist
    gains = torch.randn((num_rows, num_tasks), generator=generator, dtype=torch.float64)
    return groups, (gains * 0.2 - 0.05) * groups


@pytest.mark.parametrize("mode", ["cover", "partition"])
def test_beyond_the_subset_programme_auto_stays_exact(mode):
    groups, gains = _sparse_instance(11, 22, 24)
    result = select_groups(groups, gains, max_groups=3, mode=mode)
    expected = brute_force(groups, gains, 3, mode, True)
    assert result.exact
    assert (result.chosen, result.objective) == expected


def _served(result: SelectionResult, groups: torch.Tensor, gains: torch.Tensor) -> list[float]:
    num_rows = groups.shape[0]
    rows = [gains[c] if c < num_rows else torch.zeros(groups.shape[1]) for c in result.chosen]
    table = torch.stack(rows).double().masked_fill(~result.groups, float("-inf"))
    return table.amax(dim=0).tolist()


def test_sixty_four_tasks_use_the_top_bit():
    generator = torch.Generator().manual_seed(12)
    groups = torch.zeros((5, 64), dtype=torch.bool)
    groups[0, :41] = True
    groups[1, 30:] = True
    groups[2, :32] = True
    groups[3, 32:] = True
    groups[4, [5, 63]] = True
    gains = torch.randn((5, 64), generator=generator, dtype=torch.float64) * groups
    for mode in ("cover", "partition"):
        result = select_groups(groups, gains, max_groups=2, mode=mode, allow_singletons=False)
        assert (result.chosen, result.objective) == brute_force(groups, gains, 2, mode, False)
        assert result.served_gain.tolist() == _served(result, groups, gains)


def test_large_instance_falls_back_to_the_heuristic_and_says_so():
    groups, gains = _sparse_instance(13, 30, 3000)
    with pytest.warns(RuntimeWarning, match="heuristic"):
        result = select_groups(groups, gains, max_groups=4)
    assert not result.exact
    assert len(result.chosen) <= 4
    assert result.served_gain.tolist() == _served(result, groups, gains)
    assert result.objective == pytest.approx(result.served_gain.mean().item(), abs=1e-15)


def test_max_groups_beyond_tasks_means_tasks():
    groups, gains = _abc()
    wide = select_groups(groups, gains, max_groups=50)
    assert wide.chosen == select_groups(groups, gains, max_groups=3).chosen
    assert wide.chosen == brute_force(groups, gains, 3, "cover", True)[0]


def test_one_task_returns_that_task():
    for allow_singletons in (True, False):
        result = select_groups(
            torch.zeros((0, 1), dtype=torch.bool),
            torch.zeros((0, 1)),
            max_groups=3,
            allow_singletons=allow_singletons,
            task_names=["only"],
        )
        assert result.group_names == [["only"]]
        assert result.objective == 0.0


def test_singletons_fill_in_and_can_be_forbidden():
    groups = torch.tensor([[True, True, False]])
    gains = torch.tensor([[0.5, 0.25, 0.0]], dtype=torch.float64)
    result = select_groups(groups, gains, max_groups=2)
    assert result.chosen == [0, 3]  # candidate 1 + 2 is task 2 alone
    assert result.group_names == [["0", "1"], ["2"]]
    with pytest.raises(ValueError, match="should allow a selection"):
        select_groups(groups, gains, max_groups=2, allow_singletons=False)


def _bad_tables():
    groups, gains = _abc()
    off_member = gains.clone()
    off_member[0, 2] = 0.5
    empty_row = groups.clone()
    empty_row[1] = False
    return {
        "abc": (groups, gains),
        "short": (groups, gains[:, :2]),
        "empty_row": (empty_row, gains * empty_row),
        "off_member": (groups, off_member),
        "lone_gain": (torch.tensor([[True, False, False]]), torch.tensor([[0.1, 0.0, 0.0]])),
        "wide": (torch.ones((1, 65), dtype=torch.bool), torch.zeros((1, 65))),
        "no_tasks": (torch.zeros((1, 0), dtype=torch.bool), torch.zeros((1, 0))),
        "float_groups": (groups.float(), gains),
        "integer_gains": (groups, gains.long()),
        "one_dimensional": (groups[0], gains[0]),
    }


@pytest.mark.parametrize(
    ("table", "kwargs", "error", "message"),
    [
        ("abc", {"max_groups": 0}, ValueError, "`max_groups` should be at least 1. Found 0"),
        ("abc", {"max_groups": -2}, ValueError, "`max_groups` should be at least 1. Found -2"),
        ("abc", {"max_groups": 1.5}, ValueError, "`max_groups` should be an int"),
        ("abc", {"max_groups": 2, "mode": "overlap"}, ValueError, "`mode` should be"),
        ("abc", {"max_groups": 2, "method": "fast"}, ValueError, "`method` should be"),
        ("abc", {"max_groups": 2, "task_names": ["A"]}, ValueError, "`task_names`"),
        ("short", {"max_groups": 2}, RuntimeError, "shape of `groups`"),
        ("empty_row", {"max_groups": 2}, ValueError, "empty row 1"),
        ("off_member", {"max_groups": 2}, ValueError, r"0 off the membership.*task 2.*group 0"),
        ("lone_gain", {"max_groups": 2}, ValueError, "one-task group"),
        ("wide", {"max_groups": 2}, ValueError, "between 1 and 64 tasks.*Found 65"),
        ("no_tasks", {"max_groups": 2}, ValueError, "between 1 and 64 tasks.*Found 0"),
        ("float_groups", {"max_groups": 2}, RuntimeError, "bool membership"),
        ("integer_gains", {"max_groups": 2}, RuntimeError, "floating tensor"),
        ("one_dimensional", {"max_groups": 2}, ValueError, "2-D bool matrix"),
    ],
)
def test_bad_input(table, kwargs, error, message):
    groups, gains = _bad_tables()[table]
    with pytest.raises(error, match=message):
        select_groups(groups, gains, **kwargs)


def test_empty_row_after_nan_check_names_row():
    groups, gains = _abc()
    groups[0] = False
    gains[0] = 0.0
    with pytest.raises(ValueError, match=r"at least one task in every row\. Found an empty row 0"):
        select_groups(groups, gains, max_groups=2)


def test_non_contiguous_and_float32_inputs():
    rng = random.Random(7)
    groups, gains = random_instance(rng, 6, with_ties=True)
    expected = brute_force(groups, gains.float().double(), 3, "cover", True)
    result = select_groups(
        groups.t().contiguous().t(), gains.float().t().contiguous().t(), max_groups=3
    )
    assert result.chosen == expected[0]
    assert result.objective == pytest.approx(expected[1], abs=1e-12)


def test_all_groups_in_bitmask_order():
    for num_tasks in (1, 2, 5):
        for min_size in (1, 2, 3):
            expected = [
                [bool(mask >> t & 1) for t in range(num_tasks)]
                for mask in range(1, 1 << num_tasks)
                if bin(mask).count("1") >= min_size
            ]
            table = all_groups(num_tasks, min_size)
            assert table.dtype == torch.bool
            assert table.tolist() == expected
    assert all_groups(10).shape == (1013, 10)
    with pytest.raises(ValueError, match="`num_tasks` should be between 1 and 20"):
        all_groups(21)
    with pytest.raises(ValueError, match="`min_size` should be at least 1"):
        all_groups(4, 0)


class _StandInPredictor:
    def __init__(self, groups: torch.Tensor, gains: torch.Tensor) -> None:
        self._groups, self._gains = groups, gains
        self.calls = 0

    def predict_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self._groups, self._gains


def test_select_from_predictor_searches_every_group():
    groups = all_groups(5)
    generator = torch.Generator().manual_seed(3)
    gains = torch.randn(groups.shape, generator=generator, dtype=torch.float64) * groups
    predictor = _StandInPredictor(groups, gains)
    result = select_from_predictor(predictor, max_groups=2, mode="partition", task_names="abcde")
    assert predictor.calls == 1
    expected = select_groups(groups, gains, max_groups=2, mode="partition")
    assert result.chosen == expected.chosen
    assert result.group_names == [
        ["abcde"[t] for t in row.nonzero().flatten()] for row in expected.groups
    ]


def test_exported_from_package():
    assert etap_torch.select_groups is select_groups
    assert etap_torch.SelectionResult is SelectionResult


def test_opcheck():
    groups, gains = _abc()
    for mode in ("cover", "partition"):
        torch.library.opcheck(
            torch.ops.etap.select_groups.default, (groups, gains, 2, mode, False, "auto")
        )


def test_max_groups_accepts_numpy_and_tensor_integers():
    import numpy as np

    groups = all_groups(4)
    gains = torch.where(groups, torch.linspace(-1, 1, groups.numel()).view(groups.shape), 0.0)
    expected = select_groups(groups, gains, max_groups=2)
    for budget in (np.int64(2), torch.tensor(2)):
        assert select_groups(groups, gains, max_groups=budget).chosen == expected.chosen
    with pytest.raises(ValueError, match="`max_groups`"):
        select_groups(groups, gains, max_groups=2.0)
