"""Fitting the ensemble predictor: etap-torch against the scikit-learn pipeline.

For N labelled groups of a T = 10 synthetic table, both fit the full ensemble (affine,
spline + ridge over the default grid with 10-fold cross-validation, residual ridge with
5-fold cross-validation). Agreement is checked first (identical chosen hyperparameters,
predictions for every group within 1e-8), then both are timed.

    python benchmarks/fit.py [--sizes 5 10 20 50 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from sklearn_reference import fit_reference, synthetic_table  # noqa: E402

from etap_torch import EnsemblePredictor  # noqa: E402

NUM_TASKS = 10


def check_agreement(predictor: EnsemblePredictor, reference, groups: np.ndarray) -> float:
    summary = predictor.summary()
    chosen = {
        "ridge__alpha": summary["spline"]["alpha"],
        "spline__degree": summary["spline"]["degree"],
        "spline__n_knots": summary["spline"]["n_knots"],
    }
    if chosen != reference.search.best_params_:
        raise SystemExit(f"spline stage disagrees: {chosen} vs {reference.search.best_params_}")
    residual_alpha = reference.residual_search.best_params_["estimator__alpha"]
    if summary["residual"]["alpha"] != residual_alpha:
        raise SystemExit(
            f"residual stage disagrees: {summary['residual']['alpha']} vs {residual_alpha}"
        )
    every_group, ours = predictor.predict_all()
    theirs = reference.predict(every_group.numpy())
    difference = float(np.abs(ours.numpy() - theirs).max())
    if difference > 1e-8:
        raise SystemExit(f"predictions differ by {difference:.3g}")
    return difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--repeats", type=int, default=5, help="timed fits of etap-torch")
    arguments = parser.parse_args()

    print(f"torch threads: {torch.get_num_threads()}")
    header = f"{'N':>4} {'pairs':>6} {'chosen (deg, knots, alpha | res)':>36} {'max |diff|':>11}"
    header += f" {'sklearn s':>10} {'etap ms':>9} {'speed-up':>9}"
    print(header)
    for num_groups in arguments.sizes:
        affinity, groups, gains = synthetic_table(NUM_TASKS, num_groups, seed=num_groups)
        tensors = [torch.from_numpy(a) for a in (affinity, groups, gains)]

        start = time.perf_counter()
        reference = fit_reference(affinity, groups, gains)
        sklearn_seconds = time.perf_counter() - start

        predictor = EnsemblePredictor().fit(*tensors)
        difference = check_agreement(predictor, reference, groups)
        timings = []
        for _ in range(arguments.repeats):
            start = time.perf_counter()
            EnsemblePredictor().fit(*tensors)
            timings.append(time.perf_counter() - start)
        ours = float(np.median(timings))

        summary = predictor.summary()
        spline = summary["spline"]
        chosen = (
            f"{spline['degree']}, {spline['n_knots']}, {spline['alpha']:g} | "
            f"{summary['residual']['alpha']:.3g}"
        )
        print(
            f"{num_groups:>4} {summary['num_pairs']:>6} {chosen:>36} {difference:>11.2e}"
            f" {sklearn_seconds:>10.2f} {1e3 * ours:>9.2f} {sklearn_seconds / ours:>8.0f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
