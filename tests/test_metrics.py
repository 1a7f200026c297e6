"""Prediction quality against scikit-learn's and numpy's own metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_squared_error, r2_score

from etap_torch import prediction_quality


def test_matches_reference_metrics_on_member_entries() -> None:
    rng = np.random.default_rng(0)
    groups = rng.random((30, 6)) < 0.5
    groups[0] = [True, False, False, False, False, False]  # a singleton: ignored
    measured = np.where(groups, rng.normal(size=groups.shape), 0.0)
    predicted = np.where(groups, measured + rng.normal(0, 0.3, groups.shape), 0.0)
    predicted[0, 0] = 100.0
    quality = prediction_quality(*(torch.from_numpy(a) for a in (groups, predicted, measured)))

    entries = groups & (groups.sum(axis=1, keepdims=True) >= 2)
    truth, guess = measured[entries], predicted[entries]
    assert quality.num_entries == int(entries.sum())
    assert quality.r2 == pytest.approx(r2_score(truth, guess), rel=1e-12)
    assert quality.pearson == pytest.approx(np.corrcoef(truth, guess)[0, 1], rel=1e-12)
    assert quality.rmse == pytest.approx(math.sqrt(mean_squared_error(truth, guess)), rel=1e-12)


def test_rejects_tables_without_pairs_and_bad_shapes() -> None:
    groups = torch.eye(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="at least one group of two or more tasks"):
        prediction_quality(groups, torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="`predicted` should have the shape of `groups`"):
        prediction_quality(groups, torch.zeros(2, 3), torch.zeros(3, 3))
