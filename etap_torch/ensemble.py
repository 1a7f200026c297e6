"""The ensemble predictor of algorithm.md section 6, and the group affinity feature.

The fitting runs in C++ (``torch.classes.etap.EnsemblePredictor``, on Eigen, float64);
this module gives it a typed Python face, saving and loading, and a summary.

Conventions: ``affinity`` is ``[T, T]`` with ``affinity[s, t]`` the affinity of source
task ``s`` onto target task ``t``; ``groups`` is a bool membership matrix ``[N, T]``;
``gains`` is ``[N, T]`` with zeros off membership.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

import etap_torch._ext  # noqa: F401  (loads the compiled library)

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_DEGREES",
    "DEFAULT_RESIDUAL_ALPHAS",
    "MAX_ENUMERATED_TASKS",
    "EnsemblePredictor",
    "group_affinity",
    "kfold_boundaries",
    "ridge_cv_scores",
    "ridge_fit",
    "spline_basis",
]

#: Spline ridge penalties: 0.001..0.005, 0.01..0.1, 0.2..1 (24 values).
DEFAULT_ALPHAS: tuple[float, ...] = (
    tuple(round(0.001 * i, 3) for i in range(1, 6))
    + tuple(round(0.01 * i, 2) for i in range(1, 11))
    + tuple(round(0.1 * i, 1) for i in range(2, 11))
)
#: Spline degrees 2..6.
DEFAULT_DEGREES: tuple[int, ...] = (2, 3, 4, 5, 6)
#: Residual ridge penalties: ``numpy.logspace(-6, 2, 20)``.
DEFAULT_RESIDUAL_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-6, 2, 20))
#: ``predict_all`` enumerates 2**T groups; beyond this many tasks it refuses.
MAX_ENUMERATED_TASKS = 20

_NONLINEAR_CODES = {None: 0, "spline": 1, "knn": 2}
_NONLINEAR_NAMES = {code: name for name, code in _NONLINEAR_CODES.items()}
_STAGE_PRESETS: dict[str, tuple[str | None, bool]] = {
    "affine": (None, False),
    "affine+spline": ("spline", False),
    "affine+knn": ("knn", False),
    "full": ("spline", True),
    "full+knn": ("knn", True),
}


def _cpp_class() -> Any:
    return torch.classes.etap.EnsemblePredictor


def group_affinity(affinity: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The group affinity feature ``x(S, t)`` of every member of every group.

    ``x(S, t)`` is the mean over the other members ``s`` of ``S`` of ``affinity[s, t]``.

    Args:
        affinity: ``[T, T]`` floating, ``affinity[s, t]`` from source ``s`` onto target ``t``.
        groups: ``[N, T]`` bool membership (only bool is accepted, so that no check has to
            read the values).

    Returns:
        ``[N, T]`` of ``affinity``'s dtype and device: ``x(S, t)`` for members of groups of
        two or more tasks, zero for non-members and for singletons. Differentiable in
        ``affinity``; works on any device.

    Example:
        >>> affinity = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
        >>> group_affinity(affinity, torch.tensor([[True, True, False]]))
        tensor([[4., 2., 0.]])
    """
    return torch.ops.etap.group_affinity(affinity, groups)


def spline_basis(
    fit_values: torch.Tensor, values: torch.Tensor, degree: int, n_knots: int
) -> torch.Tensor:
    """B-spline basis fitted on ``fit_values`` ``[n]`` and evaluated at ``values`` ``[m]``.

    Uniform knots over the range of ``fit_values``, constant extrapolation, bias column
    kept (scikit-learn's ``SplineTransformer`` with those options). Returns
    ``[m, n_knots + degree - 1]`` float64.
    """
    return _cpp_class().spline_basis(fit_values, values, degree, n_knots)


def ridge_cv_scores(
    features: torch.Tensor, targets: torch.Tensor, alphas: Sequence[float], n_folds: int
) -> torch.Tensor:
    """Cross-validated mean squared error of ridge for each alpha.

    Args:
        features: ``[n, p]`` inputs. targets: ``[n, m]`` outputs (the error is the mean
            over all outputs).
        alphas: penalties, each finite and ``>= 0``.
        n_folds: contiguous unshuffled folds; reduced to ``n`` when ``n < n_folds``;
            fewer than two samples is an error.

    Returns:
        ``[len(alphas)]`` float64: the plain mean over folds of each fold's mean squared
        error, ridge with an unpenalised intercept.
    """
    return _cpp_class().ridge_cv(features, targets, [float(a) for a in alphas], n_folds)


def ridge_fit(
    features: torch.Tensor, targets: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge with an unpenalised intercept: coefficients ``[p, m]`` and intercept ``[m]``.

    A feature that is constant gets a coefficient of exactly zero.
    """
    return _cpp_class().ridge_fit(features, targets, float(alpha))


def kfold_boundaries(n: int, n_folds: int) -> list[int]:
    """Boundaries ``[folds + 1]`` of the contiguous folds used for ``n`` samples.

    Fold ``f`` holds samples ``boundaries[f]`` to ``boundaries[f + 1] - 1``; the first
    ``n % folds`` folds hold one sample more. ``n_folds`` is reduced to ``n`` when larger.
    """
    return list(_cpp_class().kfold_boundaries(n, n_folds))


class EnsemblePredictor:
    """Predicts the gain of every task group from an affinity matrix and a few labels.

    The stages (algorithm.md section 6):

    1. affine: ``z = a * x(S, t) + b`` by least squares on the training pairs (every member
       ``t`` of every training group ``S`` of two or more tasks, in row-major order);
    2. non-linear ``f(z)``: a B-spline basis + ridge (``nonlinear="spline"``), degree,
       number of knots and alpha by ``n_folds``-fold cross-validation, or k nearest
       neighbours (``nonlinear="knn"``), k by ``neighbor_folds``-fold cross-validation, or
       nothing (``f(z) = z``);
    3. residual: one multi-output ridge from a group's membership vector to its members'
       residuals, alpha by ``residual_folds``-fold cross-validation over the groups.

    Prediction for a member ``t`` of a group ``S`` of two or more tasks is
    ``f(a * x(S, t) + b) + h(u_S)[t]``; non-members and singletons get zero.

    Cross-validation uses contiguous, unshuffled folds; a candidate's score is the plain
    mean of its per-fold mean squared errors and an exact tie goes to the earliest
    candidate (alpha outermost, then degree, then number of knots). Fewer samples than
    folds reduces the folds to the number of samples; fewer than two samples is an
    error. Ties in neighbour distance go to the earlier training pair. Singleton training
    groups carry no pair and no residual row (their gain is zero by definition).

    Inputs may live on any device and have any floating dtype; fitting and prediction run on
    the CPU in float64.

    Args:
        stages: a preset, ``"full"`` (spline + residual, the default), ``"affine"``,
            ``"affine+spline"``, ``"affine+knn"`` or ``"full+knn"``; overridden by
            ``nonlinear`` / ``residual`` when those are given.
        nonlinear: ``"spline"``, ``"knn"`` or ``None``.
        residual: whether to fit the residual stage.
        degrees: spline degrees to try (default 2..6).
        n_knots: numbers of knots to try (default ``2 .. floor(sqrt(n_pairs)) + 9``).
        alphas: spline ridge penalties (default the 24 values of ``DEFAULT_ALPHAS``).
        n_folds: folds for the spline stage (default 10).
        neighbors: k values to try (default ``1 .. min(floor(sqrt(n)) + 20, n) - 1``).
        neighbor_folds: folds for the neighbour stage (default 5).
        residual_alphas: residual ridge penalties (default ``logspace(-6, 2, 20)``).
        residual_folds: folds for the residual stage (default 5).

    Example:
        >>> affinity = torch.tensor([[0.0, 0.2, 0.1], [0.3, 0.0, 0.4], [0.1, 0.5, 0.0]])
        >>> groups = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]]).bool()
        >>> gains = torch.tensor([[0.1, 0.2, 0], [0, 0.3, 0.1], [0.05, 0, 0.1], [0.1, 0.2, 0.2]])
        >>> predictor = EnsemblePredictor(stages="affine").fit(affinity, groups, gains)
        >>> predictor.predict(groups).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        stages: Literal["full", "affine", "affine+spline", "affine+knn", "full+knn"] = "full",
        *,
        nonlinear: Literal["spline", "knn"] | str | None = "default",
        residual: bool | None = None,
        degrees: Sequence[int] = DEFAULT_DEGREES,
        n_knots: Sequence[int] | None = None,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        n_folds: int = 10,
        neighbors: Sequence[int] | None = None,
        neighbor_folds: int = 5,
        residual_alphas: Sequence[float] = DEFAULT_RESIDUAL_ALPHAS,
        residual_folds: int = 5,
    ) -> None:
        if stages not in _STAGE_PRESETS:
            raise ValueError(
                f"Parameter `stages` should be one of {sorted(_STAGE_PRESETS)}. Found {stages!r}."
            )
        preset_nonlinear, preset_residual = _STAGE_PRESETS[stages]
        if nonlinear == "default":
            nonlinear = preset_nonlinear
        if nonlinear not in _NONLINEAR_CODES:
            raise ValueError(
                f"Parameter `nonlinear` should be 'spline', 'knn' or None. Found {nonlinear!r}."
            )
        if residual is None:
            residual = preset_residual
        # TODO(shuffled-folds): folds are always contiguous and unshuffled, as the method
        # specifies; a seeded shuffle of the pairs before cross-validation is not offered yet.
        self._impl = _cpp_class()(
            _NONLINEAR_CODES[nonlinear],
            bool(residual),
            [int(d) for d in degrees],
            [int(k) for k in (n_knots or ())],
            [float(a) for a in alphas],
            int(n_folds),
            [int(k) for k in (neighbors or ())],
            int(neighbor_folds),
            [float(a) for a in residual_alphas],
            int(residual_folds),
        )

    def fit(
        self, affinity: torch.Tensor, groups: torch.Tensor, gains: torch.Tensor
    ) -> EnsemblePredictor:
        """Fits every stage.

        Args:
            affinity: ``[T, T]`` floating, finite; kept for later predictions.
            groups: ``[N, T]`` bool membership of the labelled groups; no empty row.
            gains: ``[N, T]`` floating, finite, zero off membership.

        Returns:
            ``self``.
        """
        self._impl.fit(affinity, groups, gains)
        return self

    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` (or ``load_state_dict`` of a fitted state) has run."""
        return bool(self._impl.is_fitted())

    @property
    def num_tasks(self) -> int:
        """``T``, the number of tasks of the fitted affinity."""
        self._require_fitted("num_tasks")
        return int(self._impl.state()["affinity"].shape[0])

    def predict(self, groups: torch.Tensor) -> torch.Tensor:
        """Predicted gains ``[M, T]`` float64 for ``groups`` ``[M, T]`` bool (no empty row).

        Members of groups of two or more tasks get a prediction; non-members and
        singletons get zero.
        """
        return self._impl.predict(groups)

    def predict_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every group of two or more tasks and its predicted gains.

        Groups are ordered by their bitmask ascending (bit ``t`` is task ``t``). ``T`` may be
        at most ``MAX_ENUMERATED_TASKS`` (2**20 groups).

        Returns:
            ``(groups [2**T - T - 1, T] bool, gains [2**T - T - 1, T] float64)``.
        """
        num_tasks = self.num_tasks
        if num_tasks > MAX_ENUMERATED_TASKS:
            raise ValueError(
                f"Parameter `affinity` should have at most {MAX_ENUMERATED_TASKS} tasks for "
                f"`predict_all`. Found {num_tasks}; pass candidate groups to `predict`."
            )
        masks = torch.arange(1 << num_tasks, dtype=torch.int64)
        bits = torch.tensor([1 << task for task in range(num_tasks)], dtype=torch.int64)
        groups = (masks[:, None] & bits[None, :]) != 0
        groups = groups[groups.sum(dim=1) >= 2]
        return groups, self.predict(groups)

    def state_dict(self) -> dict[str, torch.Tensor | int | float]:
        """Configuration and fitted parameters as plain tensors and numbers.

        Loading it into a fresh predictor gives bit-identical predictions.
        """
        state: dict[str, torch.Tensor | int | float] = {}
        for key, value in self._impl.state().items():
            if value.dim() == 0:
                state[key] = value.item()
            else:
                state[key] = value.clone()
        return state

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor | int | float]) -> None:
        """Replaces configuration and fitted parameters by those of ``state_dict``."""
        tensors: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, bool | int):
                tensors[key] = torch.tensor(int(value), dtype=torch.int64)
            elif isinstance(value, float):
                tensors[key] = torch.tensor(value, dtype=torch.float64)
            else:
                raise TypeError(
                    f"Parameter `state_dict` should map names to tensors or numbers. "
                    f"Found {type(value).__name__} for {key!r}."
                )
        for key, value in tensors.items():
            # Fitted parameters and grids must be finite; cross-validation scores may hold
            # inf for candidates that could not be scored.
            if key.endswith("cv_scores") or not value.is_floating_point():
                continue
            if not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"Parameter `state_dict` should hold finite values. Found non-finite "
                    f"values in {key!r}."
                )
        self._impl = _cpp_class().from_state(tensors)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor | int | float]
    ) -> EnsemblePredictor:
        """A new predictor with the configuration and parameters of ``state_dict``."""
        predictor = cls()
        predictor.load_state_dict(state_dict)
        return predictor

    def __getstate__(self) -> dict[str, Any]:
        return {"state_dict": self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["state_dict"])

    def summary(self) -> dict[str, Any]:
        """What was chosen, and the cross-validation record.

        Keys: ``stages`` (``nonlinear``, ``residual``), ``num_pairs``, ``num_groups``,
        ``affine`` (``slope``, ``intercept``), then per fitted stage: ``spline``
        (``degree``, ``n_knots``, ``alpha``, ``cv_score``, ``cv_scores`` a
        ``[alphas, degrees, n_knots]`` tensor), ``knn`` (``k``, ``cv_score``,
        ``cv_scores``, infinite where ``k`` exceeds a training fold), ``residual``
        (``alpha``, ``cv_score``, ``cv_scores``).
        """
        self._require_fitted("summary")
        state = self.state_dict()
        result: dict[str, Any] = {
            "stages": {
                "nonlinear": _NONLINEAR_NAMES[int(state["config.nonlinear"])],
                "residual": bool(state["config.residual"]),
            },
            "num_pairs": int(state["num_pairs"]),
            "num_groups": int(state["num_groups"]),
            "affine": {"slope": state["affine.slope"], "intercept": state["affine.intercept"]},
        }
        if "spline.degree" in state:
            scores = state["spline.cv_scores"]
            assert isinstance(scores, torch.Tensor)
            result["spline"] = {
                "degree": state["spline.degree"],
                "n_knots": state["spline.n_knots"],
                "alpha": state["spline.alpha"],
                "cv_score": float(scores.min()),
                "cv_scores": scores,
            }
        if "neighbors.k" in state:
            scores = state["neighbors.cv_scores"]
            assert isinstance(scores, torch.Tensor)
            result["knn"] = {
                "k": state["neighbors.k"],
                "cv_score": float(scores.min()),
                "cv_scores": scores,
            }
        if "residual.alpha" in state:
            scores = state["residual.cv_scores"]
            assert isinstance(scores, torch.Tensor)
            result["residual"] = {
                "alpha": state["residual.alpha"],
                "cv_score": float(scores.min()),
                "cv_scores": scores,
            }
        return result

    def __repr__(self) -> str:
        if not self.is_fitted:
            return "EnsemblePredictor(unfitted)"
        summary = self.summary()
        parts = [f"slope={summary['affine']['slope']:.4g}"]
        if "spline" in summary:
            spline = summary["spline"]
            parts.append(
                f"degree={spline['degree']}, n_knots={spline['n_knots']}, alpha={spline['alpha']:g}"
            )
        if "knn" in summary:
            parts.append(f"k={summary['knn']['k']}")
        if "residual" in summary:
            parts.append(f"residual_alpha={summary['residual']['alpha']:.3g}")
        return f"EnsemblePredictor({', '.join(parts)})"

    def _require_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                f"The predictor should be fitted before `{what}`. Found an unfitted predictor."
            )
