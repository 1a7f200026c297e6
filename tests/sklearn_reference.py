"""The ensemble predictor written with scikit-learn estimators: the oracle of the tests
and the baseline of the benchmark (scikit-learn is a test dependency only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.multioutput import MultiOutputRegressor
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import SplineTransformer

from etap_torch.ensemble import DEFAULT_ALPHAS, DEFAULT_DEGREES, DEFAULT_RESIDUAL_ALPHAS


def pair_features(affinity: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """x(S, t) by brute force, ``[N, T]``, zero off membership and for singletons."""
    features = np.zeros(groups.shape)
    for row, member in enumerate(groups):
        tasks = np.flatnonzero(member)
        if len(tasks) < 2:
            continue
        for target in tasks:
            sources = [s for s in tasks if s != target]
            features[row, target] = np.mean([affinity[s, target] for s in sources])
    return features


@dataclass
class ReferenceFit:
    slope: float
    intercept: float
    search: GridSearchCV | None
    residual_search: GridSearchCV | None
    affinity: np.ndarray

    def predict(self, groups: np.ndarray) -> np.ndarray:
        features = pair_features(self.affinity, groups)
        entries = groups & (groups.sum(axis=1, keepdims=True) >= 2)
        z = self.slope * features[entries] + self.intercept
        fitted = self.search.predict(z[:, None]) if self.search is not None else z
        prediction = np.zeros(groups.shape)
        prediction[entries] = fitted
        if self.residual_search is not None:
            correction = self.residual_search.predict(groups.astype(np.float64))
            prediction[entries] += correction[entries]
        return prediction


def fit_reference(
    affinity: np.ndarray,
    groups: np.ndarray,
    gains: np.ndarray,
    *,
    nonlinear: str | None = "spline",
    residual: bool = True,
    alphas=DEFAULT_ALPHAS,
    degrees=DEFAULT_DEGREES,
    n_knots=None,
    n_folds: int = 10,
    residual_alphas=DEFAULT_RESIDUAL_ALPHAS,
    residual_folds: int = 5,
    neighbor_folds: int = 5,
) -> ReferenceFit:
    """Affine LinearRegression, GridSearchCV(Pipeline(SplineTransformer, Ridge)) (or
    KNeighborsRegressor), then GridSearchCV(MultiOutputRegressor(Ridge)) on residuals."""
    groups = groups.astype(bool)
    rows = groups.sum(axis=1) >= 2
    groups, gains = groups[rows], gains[rows]
    features = pair_features(affinity, groups)
    x, y = features[groups], gains[groups]
    n = len(x)

    affine = LinearRegression().fit(x[:, None], y)
    slope, intercept = float(affine.coef_[0]), float(affine.intercept_)
    z = slope * x + intercept

    search = None
    if nonlinear == "spline":
        knots = list(n_knots) if n_knots else list(range(2, math.isqrt(n) + 10))
        pipeline = Pipeline(
            [
                ("spline", SplineTransformer(include_bias=True)),
                ("ridge", Ridge()),
            ]
        )
        grid = {
            "ridge__alpha": list(alphas),
            "spline__degree": list(degrees),
            "spline__n_knots": knots,
        }
        search = GridSearchCV(
            pipeline, grid, cv=KFold(min(n_folds, n)), scoring="neg_mean_squared_error"
        )
        search.fit(z[:, None], y)
    elif nonlinear == "knn":
        grid = {"n_neighbors": list(range(1, min(math.isqrt(n) + 20, n)))}
        search = GridSearchCV(
            KNeighborsRegressor(),
            grid,
            cv=KFold(min(neighbor_folds, n)),
            scoring="neg_mean_squared_error",
            error_score=np.nan,
        )
        search.fit(z[:, None], y)

    fit = ReferenceFit(slope, intercept, search, None, affinity)
    if residual:
        fitted = fit.predict(groups)
        residuals = np.where(groups, gains - fitted, 0.0)
        residual_search = GridSearchCV(
            MultiOutputRegressor(Ridge()),
            {"estimator__alpha": list(residual_alphas)},
            cv=KFold(min(residual_folds, len(groups))),
            scoring="neg_mean_squared_error",
        )
        residual_search.fit(groups.astype(np.float64), residuals)
        fit.residual_search = residual_search
    return fit


def synthetic_table(
    num_tasks: int, num_groups: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A realistic gain table: affinity with task clusters, distinct random groups of two
    or more tasks, gains a saturating function of the group affinity plus a per-task
    effect of group size and noise. Returns ``(affinity [T, T], groups [N, T] bool,
    gains [N, T])``."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 3, num_tasks)
    affinity = np.where(cluster[:, None] == cluster[None, :], 0.4, -0.1)
    affinity = affinity + rng.normal(0.0, 0.15, (num_tasks, num_tasks))
    masks: list[int] = []
    while len(masks) < num_groups:
        mask = int(rng.integers(1, 1 << num_tasks))
        if bin(mask).count("1") >= 2 and mask not in masks:
            masks.append(mask)
    groups = np.array([[(m >> t) & 1 for t in range(num_tasks)] for m in masks], dtype=bool)
    features = pair_features(affinity, groups)
    size_effect = rng.normal(0.0, 0.02, num_tasks)
    sizes = groups.sum(axis=1, keepdims=True)
    gains = 0.25 * np.tanh(3.0 * features) + size_effect * sizes
    gains = gains + rng.normal(0.0, 0.03, groups.shape)
    return affinity, groups, np.where(groups, gains, 0.0)
