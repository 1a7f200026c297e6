"""The main job, end to end, on a bundled dataset and its committed ground truth.

1. Train the all-tasks model of the dataset's recipe with an `AffinityTracker`
   (first-order affinity) and, on every `lookahead_every`-th step, TAG's exact
   lookahead (the reference).
2. Take `labelled` groups of two or more tasks at random (seeded) from the ground
   truth as the few real group trainings; every other group of two or more tasks is
   held out.
3. Fit the ensemble predictor on them; predict the held-out groups. The same is done
   for the affine stage alone, and for the exact lookahead affinity through the affine
   stage alone.
4. Choose groupings of at most `B` groups (cover mode) from the predicted gains, with
   the labelled groups at their measured gains, and read the true total test loss of
   each choice from the ground truth.

The truth of a group is the mean over the ground truth's seeds. Everything printed is
also written to `report.json` in the output folder, with the held-out predictions, so
each number can be recomputed from the file.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from etap_torch.datasets import GroundTruth, load_ground_truth
from etap_torch.ensemble import EnsemblePredictor
from etap_torch.grouping import select_groups
from etap_torch.lookahead import exact_lookahead
from etap_torch.metrics import prediction_quality
from etap_torch.tracker import AffinityTracker
from etap_torch.trainers import load_dataset, recipe_for, train_group

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of one demo run; the defaults are the README's main job."""

    dataset: str = "chemical"
    labelled: int = 10
    seed: int = 0
    out_dir: str = "etap_out"
    budgets: Sequence[int] = (2, 3, 4)
    every: int = 1
    lookahead_every: int = 10
    max_epochs: int | None = None
    quality_sizes: Sequence[int] = (5, 10, 20, 30, 40, 50)
    quality_repeats: int = 5
    figures: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _error(name: str, expectation: str, found: Any) -> ValueError:
    return ValueError(f"Parameter `{name}` should {expectation}. Found {found}.")


def measure_affinity(
    dataset: str, *, seed: int, every: int, lookahead_every: int, max_epochs: int | None
) -> dict[str, Any]:
    """Train the all-tasks model once; return both affinities and the run's cost.

    Returns a dict with `affinity` and `lookahead` ([T, T] float64 numpy arrays, the
    mean over measured steps; `lookahead` is None when `lookahead_every` is 0),
    `counts`, `seconds`, `lookahead_seconds`, `epochs` and `test_losses`.
    """
    data = load_dataset(dataset)
    recipe = recipe_for(dataset)
    if max_epochs is not None:
        recipe = dataclasses.replace(recipe, max_epochs=int(max_epochs))
    members = list(range(data.num_tasks))
    lookahead_sum = np.zeros((data.num_tasks, data.num_tasks))
    lookahead_count = np.zeros((data.num_tasks, data.num_tasks))
    lookahead_seconds = 0.0
    steps = 0

    def on_batch(model, compute_losses, optimizer) -> None:
        nonlocal steps, lookahead_seconds
        steps += 1
        if not lookahead_every or (steps - 1) % lookahead_every:
            return
        started = time.perf_counter()
        scores = exact_lookahead(
            compute_losses, model.shared_parameters(), optimizer, model=model
        ).numpy()
        valid = np.isfinite(scores)
        lookahead_sum[valid] += scores[valid]
        lookahead_count[valid] += 1
        lookahead_seconds += time.perf_counter() - started

    started = time.perf_counter()
    result = train_group(
        data,
        members,
        recipe,
        seed,
        make_tracker=lambda params, optimizer: AffinityTracker(params, optimizer, every=every),
        on_batch=on_batch,
    )
    seconds = time.perf_counter() - started
    tracker = result.tracker
    lookahead = None
    if lookahead_every:
        lookahead = np.divide(
            lookahead_sum,
            lookahead_count,
            out=np.zeros_like(lookahead_sum),
            where=lookahead_count > 0,
        )
    return {
        "task_names": data.task_names,
        "affinity": tracker.affinity.double().numpy(),
        "stderr": tracker.stderr.double().numpy(),
        "counts": tracker.counts.numpy(),
        "lookahead": lookahead,
        "seconds": seconds,
        "lookahead_seconds": lookahead_seconds,
        "epochs": result.epochs,
        "test_losses": result.test_losses.double().numpy(),
    }


def truth_tables(dataset: str) -> tuple[GroundTruth, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The committed ground truth and its tables averaged over seeds.

    Returns `(truth, groups [N, T] bool, gains [N, T] float64, test losses [N, T] float64)`.
    """
    truth = load_ground_truth(dataset)
    groups = torch.as_tensor(truth.groups, dtype=torch.bool)
    gains = truth.mean_gains.to(torch.float64)
    losses = truth.test_losses.to(torch.float64).mean(dim=0)
    return truth, groups, gains, losses


def split_groups(groups: torch.Tensor, labelled: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `labelled` groups of two or more tasks drawn at random, and the rest.

    Both index arrays are sorted and refer to rows of `groups`; singletons are in neither.
    """
    multi = np.flatnonzero(groups.sum(dim=1).numpy() >= 2)
    if not 2 <= labelled < len(multi):
        raise _error("labelled", f"be in [2, {len(multi) - 1}]", labelled)
    chosen = np.random.default_rng(seed).choice(multi, size=labelled, replace=False)
    train = np.sort(chosen)
    held_out = np.setdiff1d(multi, train)
    return train, held_out


def fit_and_score(
    affinity: np.ndarray,
    groups: torch.Tensor,
    gains: torch.Tensor,
    train: np.ndarray,
    held_out: np.ndarray,
    stages: str = "full",
) -> tuple[EnsemblePredictor, torch.Tensor, dict[str, float]]:
    """Fit one predictor on the `train` rows; predict and score the `held_out` rows."""
    predictor = EnsemblePredictor(stages).fit(
        torch.as_tensor(affinity, dtype=torch.float64), groups[train], gains[train]
    )
    predicted = predictor.predict(groups[held_out])
    quality = prediction_quality(groups[held_out], predicted, gains[held_out])
    return (
        predictor,
        predicted,
        {"r2": quality.r2, "pearson": quality.pearson, "rmse": quality.rmse},
    )


def served_losses(
    selection_chosen: Sequence[int],
    serving: torch.Tensor,
    candidate_rows: np.ndarray,
    losses: torch.Tensor,
    single_losses: torch.Tensor,
) -> torch.Tensor:
    """[T] true test loss of each task in the group that serves it.

    `selection_chosen[serving[t]]` is a candidate index: below `len(candidate_rows)` a row
    of the candidate table (ground-truth row `candidate_rows[i]`), otherwise a singleton.
    """
    num_tasks = single_losses.numel()
    out = torch.empty(num_tasks, dtype=torch.float64)
    for task in range(num_tasks):
        candidate = selection_chosen[int(serving[task])]
        if candidate < len(candidate_rows):
            out[task] = losses[candidate_rows[candidate], task]
        else:
            out[task] = single_losses[task]
    return out


def choose_groupings(
    groups: torch.Tensor,
    predicted_gains: torch.Tensor,
    losses: torch.Tensor,
    budgets: Sequence[int],
    task_names: Sequence[str],
    weight_by_single_loss: bool = True,
) -> list[dict[str, Any]]:
    """For each budget B: ETAP's choice, the exhaustive optimum and the two fixed baselines.

    `groups` [N, T] is the whole ground-truth table, `predicted_gains` [N, T] the gains
    the choice is made from, `losses` [N, T] the true test losses. The optimum minimises
    the true total test loss exactly: it maximises the mean absolute loss reduction over
    single-task models, `L_t({t}) - L_t(S)`, which is the cover objective on those values.

    With `weight_by_single_loss` (the default) the choice maximises the predicted
    reduction of the total loss, `gain(S, t) * L_t({t})`: the single-task losses are
    measured anyway (every gain is relative to them), and the total loss is what the
    grouping is judged on. Without it the choice maximises the mean relative gain.
    """
    sizes = groups.sum(dim=1)
    num_tasks = groups.shape[1]
    single_losses = torch.empty(num_tasks, dtype=torch.float64)
    for task in range(num_tasks):
        row = int(torch.nonzero((sizes == 1) & groups[:, task])[0, 0])
        single_losses[task] = losses[row, task]
    everything = int(torch.nonzero(sizes == num_tasks)[0, 0])
    all_tasks_total = float(losses[everything].sum())
    per_task_total = float(single_losses.sum())

    candidate_rows = np.flatnonzero(sizes.numpy() >= 2)
    candidates = groups[candidate_rows]
    reductions = torch.where(candidates, single_losses[None, :] - losses[candidate_rows], 0.0)

    choice_values = predicted_gains[candidate_rows]
    if weight_by_single_loss:
        choice_values = choice_values * single_losses[None, :]

    rows = []
    for budget in budgets:
        ours = select_groups(
            candidates,
            choice_values,
            max_groups=budget,
            task_names=task_names,
        )
        best = select_groups(candidates, reductions, max_groups=budget, task_names=task_names)
        ours_total = float(
            served_losses(ours.chosen, ours.serving, candidate_rows, losses, single_losses).sum()
        )
        best_total = float(
            served_losses(best.chosen, best.serving, candidate_rows, losses, single_losses).sum()
        )
        rows.append(
            {
                "budget": int(budget),
                "chosen": ours.group_names,
                "total_loss": ours_total,
                "optimum_groups": best.group_names,
                "optimum_total_loss": best_total,
                "gap": (ours_total - best_total) / best_total,
                "all_tasks_total_loss": all_tasks_total,
                "per_task_total_loss": per_task_total,
                "exact": bool(ours.exact and best.exact),
            }
        )
    return rows


def choose_with_predictor(
    predictor: EnsemblePredictor,
    groups: torch.Tensor,
    gains: torch.Tensor,
    losses: torch.Tensor,
    train: np.ndarray,
    budgets: Sequence[int],
    task_names: Sequence[str],
) -> list[dict[str, Any]]:
    """`choose_groupings` from the predicted gains of every group.

    The labelled `train` rows enter at their measured gains.
    """
    choice_gains = predictor.predict(groups)
    choice_gains[train] = gains[train]
    return choose_groupings(groups, choice_gains, losses, budgets, task_names)


def quality_curve(
    affinity: np.ndarray,
    groups: torch.Tensor,
    gains: torch.Tensor,
    sizes: Sequence[int],
    repeats: int,
    seed: int,
) -> list[dict[str, float]]:
    """Mean and standard deviation of R^2, Pearson and RMSE against the labelled count."""
    available = int((groups.sum(dim=1) >= 2).sum())
    curve = []
    for size in sizes:
        if size >= available:
            continue
        scores = []
        for repeat in range(repeats):
            train, held_out = split_groups(groups, size, seed * 1000 + repeat)
            scores.append(fit_and_score(affinity, groups, gains, train, held_out)[2])
        entry: dict[str, float] = {"labelled": int(size)}
        for metric in ("r2", "pearson", "rmse"):
            values = np.array([s[metric] for s in scores])
            entry[metric] = float(np.mean(values))
            entry[f"{metric}_std"] = float(np.std(values))
        curve.append(entry)
    return curve


def write_figures(report: dict[str, Any], out_dir: Path) -> list[str]:
    """Affinity heatmap, predicted against true gains, and quality against labelled count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["task_names"]
    paths = []

    affinity = np.asarray(report["affinity"])
    figure, axis = plt.subplots(figsize=(6, 5))
    limit = float(np.abs(affinity).max()) or 1.0
    image = axis.imshow(affinity, cmap="RdBu", vmin=-limit, vmax=limit)
    axis.set_xticks(range(len(names)), names, rotation=90)
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("target task")
    axis.set_ylabel("source task")
    axis.set_title(f"First-order affinity A[source, target], {report['config']['dataset']}")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    paths.append(str(out_dir / "affinity.png"))
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    held_out = report["held_out"]
    figure, axis = plt.subplots(figsize=(5, 5))
    truth = np.array(held_out["true"])
    for method, label in (("etap", "ETAP"), ("affine", "affine stage alone")):
        axis.scatter(truth, held_out[method], s=8, alpha=0.6, label=label)
    span = [min(truth.min(), 0.0), max(truth.max(), 0.0)]
    axis.plot(span, span, color="grey", linewidth=1)
    axis.set_xlabel("true gain (held-out groups)")
    axis.set_ylabel("predicted gain")
    axis.legend()
    axis.set_title(f"{report['config']['labelled']} labelled groups")
    figure.tight_layout()
    paths.append(str(out_dir / "predicted_vs_true.png"))
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    curve = report["quality_curve"]
    if curve:
        figure, axis = plt.subplots(figsize=(5, 4))
        sizes = [entry["labelled"] for entry in curve]
        for metric, label in (("pearson", "Pearson"), ("r2", "R^2")):
            axis.errorbar(
                sizes,
                [entry[metric] for entry in curve],
                yerr=[entry[f"{metric}_std"] for entry in curve],
                marker="o",
                capsize=3,
                label=label,
            )
        ceiling = report["noise_ceiling"]
        if ceiling:
            axis.axhline(
                ceiling["pairwise"], color="grey", linestyle="--", label="noise ceiling (Pearson)"
            )
        axis.set_xlabel("labelled groups")
        axis.set_ylabel("quality on held-out groups")
        axis.legend()
        figure.tight_layout()
        paths.append(str(out_dir / "quality_vs_labelled.png"))
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)
    return paths


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the main job; write `report.json` (and figures) to `config.out_dir`."""
    if config.labelled < 2:
        raise _error("labelled", "be at least 2", config.labelled)
    if config.every < 1:
        raise _error("every", "be a positive integer", config.every)
    if config.lookahead_every < 0:
        raise _error("lookahead_every", "be 0 (off) or a positive integer", config.lookahead_every)
    if not config.budgets or min(config.budgets) < 1:
        raise _error("budgets", "hold positive integers", list(config.budgets))
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    truth, groups, gains, losses = truth_tables(config.dataset)
    task_names = list(truth.task_names)

    train, held_out = split_groups(groups, config.labelled, config.seed)
    measured = measure_affinity(
        config.dataset,
        seed=config.seed,
        every=config.every,
        lookahead_every=config.lookahead_every,
        max_epochs=config.max_epochs,
    )

    methods: dict[str, dict[str, float]] = {}
    predictions: dict[str, torch.Tensor] = {}
    fits = [("etap", measured["affinity"], "full"), ("affine", measured["affinity"], "affine")]
    if measured["lookahead"] is not None:
        fits.append(("lookahead_affine", measured["lookahead"], "affine"))
    started = time.perf_counter()
    etap_predictor = None
    for name, affinity, stages in fits:
        predictor, predicted, quality = fit_and_score(
            affinity, groups, gains, train, held_out, stages
        )
        methods[name] = quality
        predictions[name] = predicted
        if name == "etap":
            etap_predictor = predictor
    fit_seconds = time.perf_counter() - started

    grouping = choose_with_predictor(
        etap_predictor, groups, gains, losses, train, config.budgets, task_names
    )

    member = groups[held_out]
    rows, cols = torch.nonzero(member & (member.sum(dim=1, keepdim=True) >= 2), as_tuple=True)
    held_out_table = {
        "group": [int(held_out[r]) for r in rows],
        "task": [int(c) for c in cols],
        "true": [float(gains[held_out[r], c]) for r, c in zip(rows, cols, strict=True)],
    }
    for name, predicted in predictions.items():
        held_out_table[name] = [float(predicted[r, c]) for r, c in zip(rows, cols, strict=True)]

    report: dict[str, Any] = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "task_names": task_names,
        "affinity": measured["affinity"].tolist(),
        "affinity_stderr": measured["stderr"].tolist(),
        "lookahead_affinity": None
        if measured["lookahead"] is None
        else measured["lookahead"].tolist(),
        "training": {
            "seconds": measured["seconds"],
            "lookahead_seconds": measured["lookahead_seconds"],
            "epochs": measured["epochs"],
            "measured_steps": int(np.min(measured["counts"])),
        },
        "labelled_groups": [int(i) for i in train],
        "held_out_groups": len(held_out),
        "quality": methods,
        "noise_ceiling": truth.noise_ceiling,
        "fit_seconds": fit_seconds,
        "grouping": grouping,
        "held_out": held_out_table,
        "predictor": etap_predictor.summary(),
    }
    report["quality_curve"] = quality_curve(
        measured["affinity"],
        groups,
        gains,
        config.quality_sizes,
        config.quality_repeats,
        config.seed,
    )
    if config.figures:
        report["figures"] = write_figures(report, out_dir)
    with open(out_dir / "report.json", "w") as handle:
        json.dump(report, handle, indent=1, default=_json_default)
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary that `python -m etap_torch demo` prints."""
    config = report["config"]
    lines = [
        f"etap-torch demo: {config['dataset']}, {len(report['task_names'])} tasks, "
        f"{config['labelled']} labelled groups (seed {config['seed']}), "
        f"{report['held_out_groups']} held-out groups",
        f"all-tasks training with the tracker: {report['training']['seconds']:.1f} s "
        f"({report['training']['epochs']} epoch{'' if report['training']['epochs'] == 1 else 's'}, "
        "of which exact lookahead "
        f"{report['training']['lookahead_seconds']:.1f} s); fitting: "
        f"{1000 * report['fit_seconds']:.1f} ms",
        "",
        f"{'prediction on held-out groups':<36}{'R^2':>8}{'Pearson':>9}{'RMSE':>9}",
    ]
    labels = {
        "etap": "ETAP (affine + spline + residual)",
        "affine": "affine stage alone",
        "lookahead_affine": "exact lookahead, affine stage",
    }
    for name, quality in report["quality"].items():
        lines.append(
            f"{labels[name]:<36}{quality['r2']:>8.3f}{quality['pearson']:>9.3f}"
            f"{quality['rmse']:>9.4f}"
        )
    ceiling = report["noise_ceiling"]
    if ceiling:
        lines.append(f"{'noise ceiling, seed vs seed':<36}{'':>8}{ceiling['pairwise']:>9.3f}")
        lines.append(
            f"{'noise ceiling, seed vs mean of rest':<36}{'':>8}{ceiling['one_vs_rest']:>9.3f}"
        )
    lines += [
        "",
        f"{'groups (B)':<12}{'ETAP choice':>13}{'optimum':>10}{'gap':>8}"
        f"{'one model':>11}{'per task':>10}   (true total test loss)",
    ]
    for row in report["grouping"]:
        lines.append(
            f"{row['budget']:<12}{row['total_loss']:>13.4f}{row['optimum_total_loss']:>10.4f}"
            f"{100 * row['gap']:>7.2f}%{row['all_tasks_total_loss']:>11.4f}"
            f"{row['per_task_total_loss']:>10.4f}"
        )
    for row in report["grouping"]:
        chosen = "  ".join("{" + ",".join(names) + "}" for names in row["chosen"])
        lines.append(f"B={row['budget']}: {chosen}")
    if report.get("figures"):
        lines.append("")
        lines.append("figures: " + ", ".join(report["figures"]))
    lines.append(f"report: {Path(config['out_dir']) / 'report.json'}")
    return "\n".join(lines)
