"""Prediction quality and grouping regret against the number of labelled groups.

For each dataset, the all-tasks model is trained once with the tracker (first-order
affinity) and the exact lookahead; then, for every labelled count and seed, ETAP, the
affine stage alone and the exact lookahead through the affine stage are fitted on the
labelled groups and scored on every other group of two or more tasks against the
committed ground truth (mean over its seeds). The grouping regret is the relative excess
of the true total test loss of ETAP's choice over the exhaustive optimum, averaged over
the budgets.

    python benchmarks/sweep.py                      # both datasets, 10 seeds
    python benchmarks/sweep.py --dataset chemical --seeds 3

Prints the paper-style table (mean and standard deviation over seeds); the truth of a
group is the mean of the committed ground truth over its seeds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from etap_torch.demo import (
    choose_with_predictor,
    fit_and_score,
    measure_affinity,
    split_groups,
    truth_tables,
)


def sweep_dataset(
    name: str, labelled_counts: list[int], seeds: int, budgets: list[int], lookahead_every: int
) -> tuple[list[dict], dict]:
    """The sweep's rows for one dataset, and the dataset's noise ceiling."""
    truth, groups, gains, losses = truth_tables(name)
    task_names = list(truth.task_names)
    started = time.perf_counter()
    measured = measure_affinity(
        name, seed=0, every=1, lookahead_every=lookahead_every, max_epochs=None
    )
    seconds = time.perf_counter() - started
    print(f"{name}: all-tasks training with the tracker and the lookahead: {seconds:.0f} s")

    rows = []
    for count in labelled_counts:
        scores: dict[str, list[dict[str, float]]] = {"etap": [], "affine": [], "lookahead": []}
        regrets = []
        one_model = []
        for seed in tqdm(range(seeds), desc=f"{name} N={count}", leave=False):
            train, held_out = split_groups(groups, count, seed)
            predictor, _, quality = fit_and_score(
                measured["affinity"], groups, gains, train, held_out
            )
            scores["etap"].append(quality)
            scores["affine"].append(
                fit_and_score(measured["affinity"], groups, gains, train, held_out, "affine")[2]
            )
            scores["lookahead"].append(
                fit_and_score(measured["lookahead"], groups, gains, train, held_out, "affine")[2]
            )
            grouping = choose_with_predictor(
                predictor, groups, gains, losses, train, budgets, task_names
            )
            regrets.append(np.mean([row["gap"] for row in grouping]))
            one_model.append(
                np.mean(
                    [
                        (row["all_tasks_total_loss"] - row["total_loss"])
                        / row["all_tasks_total_loss"]
                        for row in grouping
                    ]
                )
            )
        row = {"dataset": name, "labelled": count, "regret": regrets, "vs_one_model": one_model}
        for method, values in scores.items():
            for metric in ("r2", "pearson", "rmse"):
                row[f"{method}_{metric}"] = [v[metric] for v in values]
        rows.append(row)
    return rows, truth.noise_ceiling


def _cell(values: list[float], percent: bool = False) -> str:
    scale = 100.0 if percent else 1.0
    return f"{scale * np.mean(values):.3f}±{scale * np.std(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("chemical", "etth1", "both"), default="both")
    parser.add_argument("--labelled", default="5,10,20,30,40,50")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budgets", default="2,3,4")
    parser.add_argument("--lookahead-every", type=int, default=10)
    args = parser.parse_args()
    names = ["chemical", "etth1"] if args.dataset == "both" else [args.dataset]
    counts = [int(c) for c in args.labelled.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]

    header = (
        f"{'dataset':<9}{'N':>4}  {'ETAP R^2':>14}{'ETAP Pearson':>14}{'ETAP RMSE':>14}"
        f"{'affine Pearson':>16}{'lookahead Pearson':>19}{'regret %':>15}{'vs one model %':>16}"
    )
    lines = [header, "-" * len(header)]
    ceilings = []
    for name in names:
        rows, ceiling = sweep_dataset(name, counts, args.seeds, budgets, args.lookahead_every)
        ceilings.append((name, ceiling))
        for row in rows:
            lines.append(
                f"{name:<9}{row['labelled']:>4}  {_cell(row['etap_r2']):>14}"
                f"{_cell(row['etap_pearson']):>14}{_cell(row['etap_rmse']):>14}"
                f"{_cell(row['affine_pearson']):>16}{_cell(row['lookahead_pearson']):>19}"
                f"{_cell(row['regret'], percent=True):>15}"
                f"{_cell(row['vs_one_model'], percent=True):>16}"
            )
    print("\n".join(lines))
    for name, ceiling in ceilings:
        print(
            f"noise ceiling ({name}): Pearson seed vs seed {ceiling['pairwise']:.3f}, "
            f"seed vs mean of the other seeds {ceiling['one_vs_rest']:.3f}"
        )
    print(
        f"mean ± standard deviation over {args.seeds} seeds; regret = excess of the true total "
        "test loss of ETAP's choice over the exhaustive optimum; vs one model = its reduction "
        f"of the total loss against one model for all tasks; both averaged over B in {budgets}"
    )


if __name__ == "__main__":
    main()
