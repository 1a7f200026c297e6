"""ETAP on the chemical dataset, one step at a time, with real trainings throughout.

1. Train the all-tasks model once with the tracker: the affinity matrix.
2. Label a few groups for real with `collect_gains` (it also trains every single task).
3. Fit the ensemble predictor on those labels.
4. Predict every group and choose the best grouping of at most three groups.
5. Score the predictions and the choice against the committed ground truth.

    python examples/chemical_pipeline.py            # about 2 minutes on 2 cores
    python examples/chemical_pipeline.py --labelled 20 --seeds 0 1
"""

import argparse

import numpy as np
import torch

import etap_torch
from etap_torch.datasets import load_ground_truth
from etap_torch.trainers import load_dataset, recipe_for, train_all_with_affinity, train_group


def train_members(members: tuple[str, ...], seed: int) -> list[float]:
    """The training function `collect_gains` calls: one group model, each member's test loss."""
    data = load_dataset("chemical")
    indices = [data.task_names.index(name) for name in members]
    return train_group(data, indices, recipe_for("chemical"), seed).test_losses.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description="ETAP on the chemical dataset, step by step")
    parser.add_argument("--labelled", type=int, default=10, help="groups to train for real")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--budget", type=int, default=3, help="at most this many groups")
    parser.add_argument("--cache", default=".etap_cache/chemical_pipeline", help="resumable cache")
    args = parser.parse_args()

    # 1. One ordinary training run with the tracker.
    affinity, _ = train_all_with_affinity("chemical", seed=0)
    task_names = load_dataset("chemical").task_names
    print("affinity A[source, target]:")
    print(np.array2string(affinity.numpy(), precision=3, suppress_small=True))

    # 2. A few real group trainings (and every single task, for the gains).
    candidates = etap_torch.all_groups(len(task_names))
    rng = np.random.default_rng(0)
    labelled = candidates[np.sort(rng.choice(len(candidates), args.labelled, replace=False))]
    table = etap_torch.collect_gains(
        train_members, task_names, labelled, seeds=args.seeds, cache_dir=args.cache, workers=2
    )
    is_group = table.groups.sum(dim=1) >= 2

    # 3. Fit ETAP on the labelled groups.
    predictor = etap_torch.EnsemblePredictor().fit(
        affinity, table.groups[is_group], table.mean_gains[is_group]
    )
    summary = predictor.summary()
    spline, residual = summary["spline"], summary["residual"]
    print(
        f"fitted on {summary['num_pairs']} pairs: z = {summary['affine']['slope']:.4g} x "
        f"+ {summary['affine']['intercept']:.4g}; spline degree {spline['degree']}, "
        f"{spline['n_knots']} knots, alpha {spline['alpha']:g}; residual alpha "
        f"{residual['alpha']:.3g}"
    )

    # 4. Predict every group of two or more tasks and choose a grouping.
    groups, predicted = predictor.predict_all()
    choice = etap_torch.select_groups(
        groups, predicted, max_groups=args.budget, task_names=task_names
    )
    print(f"chosen groups (at most {args.budget}):", choice.group_names)
    print(f"predicted mean gain of the choice: {choice.objective:.4f}")

    # 5. Against the truth: every group was trained in the committed ground truth.
    truth = load_ground_truth("chemical")
    multi = truth.groups.sum(dim=1) >= 2
    true_gains = truth.mean_gains[multi].double()
    assert torch.equal(truth.groups[multi], groups)
    quality = etap_torch.prediction_quality(groups, predicted, true_gains)
    print(f"prediction quality on every group: {quality}")
    best = etap_torch.select_groups(groups, true_gains, max_groups=args.budget)
    truth_of_choice = etap_torch.select_groups(
        groups, predicted, max_groups=args.budget, true_gains=true_gains
    ).true_objective
    print(
        f"true mean gain of the choice {truth_of_choice:.4f}, "
        f"of the best grouping {best.objective:.4f}"
    )


if __name__ == "__main__":
    main()
