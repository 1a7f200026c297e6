"""The main job end to end on a tiny setting; its report is recomputed from its own file."""

import json

import numpy as np
import pytest
import torch

from etap_torch.__main__ import main
from etap_torch.datasets import load_ground_truth
from etap_torch.demo import DemoConfig, choose_groupings, run_demo, split_groups


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    argv = [
        "demo",
        "--max-epochs",
        "1",
        "--lookahead-every",
        "4",
        "--labelled",
        "8",
        "--quality-sizes",
        "5,10",
        "--quality-repeats",
        "2",
        "--out",
        str(out_dir),
    ]
    assert main(argv) == 0
    with open(out_dir / "report.json") as handle:
        return json.load(handle), out_dir


def test_demo_writes_report_and_figures(tiny_report):
    report, out_dir = tiny_report
    for name in ("affinity.png", "predicted_vs_true.png", "quality_vs_labelled.png"):
        assert (out_dir / name).stat().st_size > 1000
    affinity = np.array(report["affinity"])
    assert affinity.shape == (10, 10) and np.isfinite(affinity).all()
    lookahead = np.array(report["lookahead_affinity"])
    assert lookahead.shape == (10, 10) and np.isfinite(lookahead).all()
    assert len(report["labelled_groups"]) == 8
    assert [row["budget"] for row in report["grouping"]] == [2, 3, 4]


def test_demo_quality_recomputes_from_saved_predictions(tiny_report):
    report, _ = tiny_report
    held_out = report["held_out"]
    truth = np.array(held_out["true"])
    assert len(truth) > 1000
    for method in ("etap", "affine", "lookahead_affine"):
        predicted = np.array(held_out[method])
        residual = truth - predicted
        r2 = 1.0 - np.sum(residual**2) / np.sum((truth - truth.mean()) ** 2)
        pearson = np.corrcoef(truth, predicted)[0, 1]
        rmse = np.sqrt(np.mean(residual**2))
        quality = report["quality"][method]
        assert quality["r2"] == pytest.approx(r2, abs=1e-10)
        assert quality["pearson"] == pytest.approx(pearson, abs=1e-10)
        assert quality["rmse"] == pytest.approx(rmse, abs=1e-10)


def test_demo_held_out_truth_is_the_ground_truth_mean(tiny_report):
    report, _ = tiny_report
    truth = load_ground_truth("chemical")
    mean_gains = truth.gains.double().mean(dim=0)
    held_out = report["held_out"]
    pairs = zip(held_out["group"], held_out["task"], strict=True)
    expected = [float(mean_gains[g, t]) for g, t in pairs]
    assert held_out["true"] == pytest.approx(expected, abs=1e-12)
    assert not set(held_out["group"]) & set(report["labelled_groups"])


def test_demo_grouping_totals_recompute_from_ground_truth(tiny_report):
    report, _ = tiny_report
    truth = load_ground_truth("chemical")
    names = list(truth.task_names)
    losses = truth.test_losses.double().mean(dim=0)
    rows = {tuple(int(b) for b in row): i for i, row in enumerate(truth.groups.tolist())}

    def loss_of(members, task):
        key = tuple(int(t in members) for t in range(len(names)))
        return float(losses[rows[key], task])

    for row in report["grouping"]:
        chosen = [{names.index(n) for n in group} for group in row["chosen"]]
        # Every task takes the lowest true loss among the chosen groups that hold it, or its
        # single-task loss when none does (a singleton); the choice's own serving rule may
        # pick a group with a higher true loss, so this is a lower bound of the reported total.
        best = sum(
            min([loss_of(g, t) for g in chosen if t in g] + [loss_of({t}, t)])
            for t in range(len(names))
        )
        assert row["total_loss"] >= best - 1e-12
        single = sum(loss_of({t}, t) for t in range(len(names)))
        assert row["per_task_total_loss"] == pytest.approx(single, abs=1e-12)
        everything = sum(loss_of(set(range(len(names))), t) for t in range(len(names)))
        assert row["all_tasks_total_loss"] == pytest.approx(everything, abs=1e-12)
        assert row["optimum_total_loss"] <= row["total_loss"] + 1e-12
        assert row["gap"] == pytest.approx(
            (row["total_loss"] - row["optimum_total_loss"]) / row["optimum_total_loss"]
        )


def test_grouping_optimum_matches_brute_force_on_a_small_table():
    # Three tasks, every group known: the exhaustive optimum of the total loss with at
    # most two groups, by enumeration, equals the one choose_groupings reports.
    names = ["a", "b", "c"]
    groups = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    ).bool()
    losses = torch.tensor(
        [
            [1.0, 0, 0],
            [0, 2.0, 0],
            [0.7, 2.2, 0],
            [0, 0, 3.0],
            [0.9, 0, 2.5],
            [0, 1.5, 3.1],
            [0.8, 1.9, 2.9],
        ],
        dtype=torch.float64,
    )
    singles = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    gains = torch.where(groups, (singles - losses) / singles, 0.0)
    rows = choose_groupings(groups, gains, losses, [2], names)
    candidates = [i for i in range(7) if int(groups[i].sum()) >= 2]
    best = float("inf")
    options = [("row", i) for i in candidates] + [("single", t) for t in range(3)]
    for first in range(len(options)):
        for second in range(first, len(options)):
            picked = {options[first], options[second]}
            total = 0.0
            for task in range(3):
                served = [
                    float(losses[i, task])
                    for kind, i in picked
                    if kind == "row" and groups[i, task]
                ] + [float(singles[task]) for kind, t in picked if kind == "single" and t == task]
                if not served:
                    break
                total += min(served)
            else:
                best = min(best, total)
    assert rows[0]["optimum_total_loss"] == pytest.approx(best, abs=1e-12)


def test_split_groups_is_seeded_and_disjoint():
    groups = load_ground_truth("etth1").groups
    train, held_out = split_groups(groups, 10, seed=3)
    again, _ = split_groups(groups, 10, seed=3)
    assert np.array_equal(train, again)
    assert len(train) == 10 and not set(train) & set(held_out)
    assert len(train) + len(held_out) == int((groups.sum(dim=1) >= 2).sum())


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [("labelled", 1, "labelled"), ("every", 0, "every"), ("budgets", (), "budgets")],
)
def test_demo_rejects_bad_settings(tmp_path, field, value, name):
    config = DemoConfig(out_dir=str(tmp_path), **{field: value})
    with pytest.raises(ValueError, match=f"`{name}`"):
        run_demo(config)


def test_demo_rejects_too_many_labelled_groups():
    groups = load_ground_truth("etth1").groups
    with pytest.raises(ValueError, match="`labelled`"):
        split_groups(groups, 500, seed=0)
