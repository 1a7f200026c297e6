"""Ridge and its cross-validation against scikit-learn's Ridge, KFold and GridSearchCV."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold

from etap_torch.ensemble import kfold_boundaries, ridge_cv_scores, ridge_fit

ALPHAS = [1e-6, 1e-3, 0.05, 1.0, 30.0]


def sklearn_scores(features: np.ndarray, targets: np.ndarray, n_folds: int) -> np.ndarray:
    search = GridSearchCV(
        Ridge(), {"alpha": ALPHAS}, cv=KFold(n_folds), scoring="neg_mean_squared_error"
    ).fit(features, targets)
    return -search.cv_results_["mean_test_score"]


def test_folds_are_contiguous_and_the_first_ones_larger() -> None:
    assert kfold_boundaries(10, 3) == [0, 4, 7, 10]
    splits = [test for _, test in KFold(3).split(np.zeros(10))]
    assert [len(s) for s in splits] == [4, 3, 3]
    assert [s[0] for s in splits] == kfold_boundaries(10, 3)[:-1]


def test_ten_samples_three_folds_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    features, targets = rng.normal(size=(10, 3)), rng.normal(size=(10, 1))
    scores = ridge_cv_scores(torch.from_numpy(features), torch.from_numpy(targets), ALPHAS, 3)
    np.testing.assert_allclose(scores.numpy(), sklearn_scores(features, targets, 3), rtol=1e-8)


@pytest.mark.parametrize(
    ("num_samples", "num_features", "num_targets"), [(30, 4, 1), (12, 20, 3), (40, 10, 10)]
)
def test_scores_match_scikit_learn(num_samples: int, num_features: int, num_targets: int) -> None:
    rng = np.random.default_rng(num_samples)
    features = rng.normal(size=(num_samples, num_features))
    features[:, 0] = 2.5  # a constant column
    targets = features @ rng.normal(size=(num_features, num_targets))
    targets += rng.normal(size=targets.shape)
    scores = ridge_cv_scores(torch.from_numpy(features), torch.from_numpy(targets), ALPHAS, 5)
    np.testing.assert_allclose(scores.numpy(), sklearn_scores(features, targets, 5), rtol=1e-8)


def test_folds_reduce_to_the_number_of_samples() -> None:
    rng = np.random.default_rng(1)
    features, targets = rng.normal(size=(4, 2)), rng.normal(size=(4, 1))
    assert kfold_boundaries(4, 5) == [0, 1, 2, 3, 4]
    scores = ridge_cv_scores(torch.from_numpy(features), torch.from_numpy(targets), ALPHAS, 5)
    np.testing.assert_allclose(scores.numpy(), sklearn_scores(features, targets, 4), rtol=1e-8)


def test_too_few_samples_or_folds_are_refused() -> None:
    two = torch.ones(2, 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"`n_folds` should be at least 2 folds. Found 1"):
        ridge_cv_scores(two, two, ALPHAS, 1)
    one = torch.ones(1, 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"at least 2 samples.*Found 1"):
        ridge_cv_scores(one, one, ALPHAS, 5)


def test_one_sample_gives_zero_coefficients_and_the_target_as_intercept() -> None:
    features = torch.tensor([[0.7, -2.0]], dtype=torch.float64)
    targets = torch.tensor([[3.25]], dtype=torch.float64)
    coef, intercept = ridge_fit(features, targets, 1.0)
    assert coef.tolist() == [[0.0], [0.0]]
    assert intercept.tolist() == [3.25]


def test_constant_column_gets_exactly_zero() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(9, 3))
    features[:, 1] = 0.1
    targets = rng.normal(size=(9, 2))
    coef, intercept = ridge_fit(torch.from_numpy(features), torch.from_numpy(targets), 0.5)
    assert (coef[1] == 0.0).all()
    reference = Ridge(alpha=0.5).fit(features, targets)
    np.testing.assert_allclose(coef.numpy(), reference.coef_.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(intercept.numpy(), reference.intercept_, rtol=1e-10)


def test_negative_alpha_and_shape_mismatch_are_refused() -> None:
    features = torch.ones(4, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"non-negative values. Found -1"):
        ridge_fit(features, features[:, :1], -1.0)
    with pytest.raises(RuntimeError, match=r"as many rows as `features` \(4\)"):
        ridge_cv_scores(features, features[:3], ALPHAS, 2)
