"""Quality of predicted gains against measured ones (algorithm.md section 6).

Every metric is taken over the member entries of the groups of two or more tasks:
singletons have gain zero by definition and non-members carry no gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PredictionQuality", "prediction_quality"]


@dataclass(frozen=True)
class PredictionQuality:
    """Agreement of predicted and measured gains over ``num_entries`` member entries."""

    r2: float
    """Coefficient of determination, ``1 - SS_res / SS_tot`` (``nan`` if the gains are constant)."""
    pearson: float
    """Pearson correlation (``nan`` if either side is constant)."""
    rmse: float
    """Root mean squared error."""
    num_entries: int


def prediction_quality(
    groups: torch.Tensor, predicted: torch.Tensor, measured: torch.Tensor
) -> PredictionQuality:
    """R^2, Pearson correlation and RMSE of ``predicted`` against ``measured`` gains.

    Args:
        groups: ``[N, T]`` bool membership.
        predicted: ``[N, T]`` predicted gains.
        measured: ``[N, T]`` measured gains.

    Returns:
        The metrics over the member entries of rows with two or more members, in float64.
    """
    if groups.dtype != torch.bool or groups.dim() != 2:
        raise ValueError(
            "Parameter `groups` should be a bool membership matrix [N, T]. "
            f"Found dtype {groups.dtype} and shape {tuple(groups.shape)}."
        )
    for name, table in (("predicted", predicted), ("measured", measured)):
        if table.shape != groups.shape:
            raise ValueError(
                f"Parameter `{name}` should have the shape of `groups` {tuple(groups.shape)}. "
                f"Found {tuple(table.shape)}."
            )
    entries = groups & (groups.sum(dim=1, keepdim=True) >= 2)
    if not bool(entries.any()):
        raise ValueError(
            "Parameter `groups` should hold at least one group of two or more tasks. Found none."
        )
    guess = predicted.detach().to(torch.float64)[entries]
    truth = measured.detach().to(torch.float64)[entries]
    for name, values in (("predicted", guess), ("measured", truth)):
        if not bool(torch.isfinite(values).all()):
            raise ValueError(
                f"Parameter `{name}` should be finite on members. Found a non-finite value."
            )

    error = guess - truth
    residual_sum = float((error * error).sum())
    centred_truth = truth - truth.mean()
    centred_guess = guess - guess.mean()
    total_sum = float((centred_truth * centred_truth).sum())
    spread = float(centred_truth.norm() * centred_guess.norm())
    return PredictionQuality(
        r2=1.0 - residual_sum / total_sum if total_sum > 0 else float("nan"),
        pearson=float((centred_truth * centred_guess).sum()) / spread
        if spread > 0
        else float("nan"),
        rmse=float(error.pow(2).mean().sqrt()),
        num_entries=int(entries.sum()),
    )
