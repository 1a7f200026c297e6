"""The ensemble predictor against the same pipeline built from scikit-learn estimators."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import SplineTransformer
from sklearn_reference import fit_reference, pair_features, synthetic_table

from etap_torch import EnsemblePredictor
from etap_torch.ensemble import ridge_fit, spline_basis

# A grid small enough for scikit-learn to search quickly, with every axis varying.
GRID = {"degrees": (2, 3), "n_knots": (2, 4, 7), "alphas": (0.001, 0.1, 1.0)}


def random_table(num_tasks: int, num_groups: int, seed: int):
    rng = np.random.default_rng(seed)
    affinity = rng.normal(size=(num_tasks, num_tasks))
    # Distinct groups, so that no two training pairs share a feature value and nearest
    # neighbours have no ties in distance.
    masks = [m for m in range(1 << num_tasks) if bin(m).count("1") >= 2]
    chosen = rng.choice(masks, size=num_groups, replace=False)
    groups = np.array([[(m >> t) & 1 for t in range(num_tasks)] for m in chosen], dtype=bool)
    gains = np.where(groups, rng.normal(size=groups.shape), 0.0)
    return affinity, groups, gains


def as_tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def every_group(num_tasks: int) -> np.ndarray:
    masks = [m for m in range(1 << num_tasks) if bin(m).count("1") >= 2]
    return np.array([[(m >> t) & 1 for t in range(num_tasks)] for m in masks], dtype=bool)


def assert_same_as_reference(predictor: EnsemblePredictor, reference, num_tasks: int) -> None:
    summary = predictor.summary()
    if reference.search is not None and "spline" in summary:
        assert reference.search.best_params_ == {
            "ridge__alpha": summary["spline"]["alpha"],
            "spline__degree": summary["spline"]["degree"],
            "spline__n_knots": summary["spline"]["n_knots"],
        }
        ours = summary["spline"]["cv_scores"].flatten().numpy()
        theirs = -reference.search.cv_results_["mean_test_score"]
        np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-14)
    if reference.residual_search is not None:
        best = reference.residual_search.best_params_["estimator__alpha"]
        assert summary["residual"]["alpha"] == best
    groups = every_group(num_tasks)
    np.testing.assert_allclose(
        predictor.predict(torch.from_numpy(groups)).numpy(),
        reference.predict(groups),
        rtol=0,
        atol=1e-8,
    )


@pytest.mark.parametrize(
    ("table", "num_groups"),
    [("synthetic", 5), ("synthetic", 40), ("random", 12)],
)
def test_full_pipeline_matches_scikit_learn(table: str, num_groups: int) -> None:
    if table == "synthetic":
        affinity, groups, gains = synthetic_table(10, num_groups, seed=num_groups)
    else:
        affinity, groups, gains = random_table(6, num_groups, seed=num_groups)
    predictor = EnsemblePredictor(**GRID).fit(*as_tensors(affinity, groups, gains))
    reference = fit_reference(affinity, groups, gains, **GRID)
    assert_same_as_reference(predictor, reference, groups.shape[1])


def test_default_knot_grid_matches_scikit_learn() -> None:
    affinity, groups, gains = synthetic_table(10, 20, seed=7)
    grid = {"degrees": (3,), "alphas": (0.01, 0.1)}
    predictor = EnsemblePredictor(**grid).fit(*as_tensors(affinity, groups, gains))
    num_pairs = int(groups.sum())
    assert predictor.summary()["spline"]["cv_scores"].shape == (2, 1, math.isqrt(num_pairs) + 8)
    reference = fit_reference(affinity, groups, gains, **grid)
    assert_same_as_reference(predictor, reference, 10)


def test_default_grids_are_those_of_the_method() -> None:
    predictor = EnsemblePredictor()
    state = predictor.state_dict()
    expected_alphas = np.r_[
        np.arange(1, 6) * 0.001, np.arange(1, 11) * 0.01, np.arange(2, 11) * 0.1
    ]
    np.testing.assert_allclose(state["config.alphas"].numpy(), expected_alphas, rtol=1e-12)
    assert state["config.degrees"].tolist() == [2, 3, 4, 5, 6]
    assert state["config.n_folds"] == 10 and state["config.residual_folds"] == 5
    np.testing.assert_array_equal(state["config.residual_alphas"].numpy(), np.logspace(-6, 2, 20))


@pytest.mark.parametrize("stages", ["affine", "affine+spline"])
def test_partial_stages_match_scikit_learn(stages: str) -> None:
    affinity, groups, gains = synthetic_table(10, 15, seed=3)
    predictor = EnsemblePredictor(stages, **GRID).fit(*as_tensors(affinity, groups, gains))
    nonlinear = None if stages == "affine" else "spline"
    reference = fit_reference(affinity, groups, gains, nonlinear=nonlinear, residual=False, **GRID)
    assert_same_as_reference(predictor, reference, 10)
    x = pair_features(affinity, groups)[groups]
    affine = LinearRegression().fit(x[:, None], gains[groups])
    assert predictor.summary()["affine"]["slope"] == pytest.approx(affine.coef_[0], rel=1e-10)


@pytest.mark.parametrize("num_groups", [3, 10, 60])
def test_nearest_neighbours_match_scikit_learn(num_groups: int) -> None:
    affinity, groups, gains = random_table(7, num_groups, seed=num_groups)
    predictor = EnsemblePredictor("full+knn").fit(*as_tensors(affinity, groups, gains))
    reference = fit_reference(affinity, groups, gains, nonlinear="knn")
    assert predictor.summary()["knn"]["k"] == reference.search.best_params_["n_neighbors"]
    assert_same_as_reference(predictor, reference, 7)


def test_nearest_neighbour_ties_go_to_the_earlier_pair() -> None:
    # Duplicated groups give equal features with different gains: every distance ties.
    rng = np.random.default_rng(8)
    affinity = rng.normal(size=(4, 4))
    groups = np.array([[1, 1, 0, 0], [0, 1, 1, 0]] * 6, dtype=bool)
    gains = np.where(groups, rng.normal(size=groups.shape), 0.0)
    predictor = EnsemblePredictor("affine+knn", neighbors=[3]).fit(
        *as_tensors(affinity, groups, gains)
    )
    summary = predictor.summary()
    z = summary["affine"]["slope"] * pair_features(affinity, groups)[groups]
    z = z + summary["affine"]["intercept"]
    query = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)
    query_z = summary["affine"]["slope"] * pair_features(affinity, query)[query]
    query_z = query_z + summary["affine"]["intercept"]
    expected = []
    for value in query_z:
        order = np.lexsort((np.arange(len(z)), np.abs(z - value)))
        expected.append(gains[groups][order[:3]].mean())
    predicted = predictor.predict(torch.from_numpy(query)).numpy()[query]
    np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-15)


def test_predict_all_enumerates_groups_by_bitmask() -> None:
    affinity, groups, gains = synthetic_table(5, 8, seed=1)
    predictor = EnsemblePredictor("affine").fit(*as_tensors(affinity, groups, gains))
    all_groups, all_gains = predictor.predict_all()
    np.testing.assert_array_equal(all_groups.numpy(), every_group(5))
    assert all_gains.dtype == torch.float64 and all_gains.shape == (26, 5)
    assert torch.equal(all_gains, predictor.predict(all_groups))
    assert (all_gains[~all_groups] == 0).all()


def test_singletons_and_non_members_predict_zero() -> None:
    affinity, groups, gains = synthetic_table(6, 10, seed=2)
    predictor = EnsemblePredictor(**GRID).fit(*as_tensors(affinity, groups, gains))
    query = torch.tensor([[True, False, False, False, False, False], [True, True] + [False] * 4])
    predicted = predictor.predict(query)
    assert (predicted[0] == 0).all() and (predicted[1, 2:] == 0).all()
    assert (predicted[1, :2] != 0).all()


def test_constant_feature_predicts_the_mean() -> None:
    # Five pairs, all with group affinity 1.0, gains 1..5.
    affinity = torch.ones(5, 5, dtype=torch.float64)
    groups = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    gains = torch.tensor([[1.0, 2, 0, 0, 0], [0, 0, 3, 4, 5]], dtype=torch.float64)
    predictor = EnsemblePredictor("affine+spline", degrees=[3], n_knots=[4])
    predictor.fit(affinity, groups, gains)
    _, predicted = predictor.predict_all()
    assert not predicted.isnan().any()
    assert torch.equal(predicted[predictor.predict_all()[0]], torch.full((75,), 3.0).double())

    values = torch.ones(5, dtype=torch.float64)
    targets = torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]
    coef, intercept = ridge_fit(spline_basis(values, values, 3, 4), targets, 1.0)
    inputs = torch.tensor([-10.0, 1.0, 7.0], dtype=torch.float64)
    prediction = spline_basis(values, inputs, 3, 4) @ coef + intercept
    assert prediction.flatten().tolist() == [3.0, 3.0, 3.0]


def test_constant_extrapolation_of_the_fitted_spline() -> None:
    x = torch.linspace(0.0, 1.0, 20, dtype=torch.float64)
    y = torch.sin(2 * math.pi * x)[:, None]
    coef, intercept = ridge_fit(spline_basis(x, x, 3, 5), y, 1e-3)
    inputs = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    prediction = (spline_basis(x, inputs, 3, 5) @ coef + intercept).flatten()
    assert prediction[1] == pytest.approx(float(prediction[0]), abs=1e-12)
    assert prediction[2] == pytest.approx(float(prediction[0]), abs=1e-12)
    reference = make_pipeline(SplineTransformer(degree=3, n_knots=5), Ridge(alpha=1e-3))
    reference.fit(x[:, None].numpy(), y.numpy())
    np.testing.assert_allclose(
        prediction.numpy(), reference.predict(inputs[:, None].numpy()).ravel(), atol=1e-10
    )


def test_save_load_pickle_are_bit_identical() -> None:
    affinity, groups, gains = synthetic_table(8, 25, seed=4)
    for stages in ("full", "full+knn", "affine"):
        predictor = EnsemblePredictor(stages, **GRID).fit(*as_tensors(affinity, groups, gains))
        expected = predictor.predict_all()[1]

        buffer = io.BytesIO()
        torch.save(predictor.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        assert all(isinstance(v, torch.Tensor | int | float) for v in state.values())
        fresh = EnsemblePredictor()
        fresh.load_state_dict(state)
        assert torch.equal(fresh.predict_all()[1], expected)

        assert torch.equal(pickle.loads(pickle.dumps(predictor)).predict_all()[1], expected)
        buffer = io.BytesIO()
        torch.save(predictor, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded.predict_all()[1], expected)
        assert loaded.summary()["affine"] == predictor.summary()["affine"]


def test_result_does_not_depend_on_the_number_of_threads() -> None:
    affinity, groups, gains = synthetic_table(10, 30, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = EnsemblePredictor(**GRID).fit(*as_tensors(affinity, groups, gains))
        torch.set_num_threads(max(threads, 2))
        several = EnsemblePredictor(**GRID).fit(*as_tensors(affinity, groups, gains))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single.predict_all()[1], several.predict_all()[1])
    assert torch.equal(
        single.summary()["spline"]["cv_scores"], several.summary()["spline"]["cv_scores"]
    )


def test_accepts_float32_and_non_contiguous_inputs() -> None:
    affinity, groups, gains = synthetic_table(6, 12, seed=5)
    expected = EnsemblePredictor(**GRID).fit(*as_tensors(affinity, groups, gains))
    transposed = torch.from_numpy(np.ascontiguousarray(affinity.T)).t()
    predictor = EnsemblePredictor(**GRID).fit(
        transposed, torch.from_numpy(groups), torch.from_numpy(gains)
    )
    assert torch.equal(predictor.predict_all()[1], expected.predict_all()[1])
    single = EnsemblePredictor("affine").fit(
        *as_tensors(affinity.astype(np.float32), groups, gains)
    )
    assert single.predict_all()[1].dtype == torch.float64


def fit_error(stages: str = "full", **changes) -> str:
    affinity, groups, gains = (torch.from_numpy(a) for a in synthetic_table(4, 6, seed=0))
    arguments = {"affinity": affinity, "groups": groups, "gains": gains} | changes
    with pytest.raises(RuntimeError) as error:
        EnsemblePredictor(stages, **GRID).fit(**arguments)
    return str(error.value)


def test_bad_inputs_are_refused_with_the_place() -> None:
    affinity, groups, gains = (torch.from_numpy(a) for a in synthetic_table(4, 6, seed=0))
    bad = affinity.clone()
    bad[2, 1] = float("nan")
    assert "`affinity` should be finite. Found nan at row 2, column 1" in fit_error(affinity=bad)
    bad = gains.clone()
    row, column = groups.nonzero()[3].tolist()
    bad[row, column] = float("inf")
    assert f"`gains` should be finite. Found inf at row {row}, column {column}" in fit_error(
        gains=bad
    )
    bad = gains.clone()
    row, column = (~groups).nonzero()[0].tolist()
    bad[row, column] = 0.5
    assert f"zero off membership. Found 0.5 at row {row}, column {column}" in fit_error(gains=bad)
    empty = groups.clone()
    empty[4] = False
    assert "Found an empty row 4" in fit_error(groups=empty, gains=gains * empty)
    assert "`groups` should be a bool" in fit_error(groups=groups.long())
    assert "`gains` should have the shape of `groups`" in fit_error(gains=gains[:3])
    assert "square matrix [T, T]" in fit_error(affinity=affinity[:3])
    assert "with T = 4 tasks" in fit_error(groups=groups[:, :3], gains=gains[:, :3])


def test_too_few_pairs_or_groups_are_refused() -> None:
    affinity = torch.eye(3, dtype=torch.float64)
    singletons = torch.eye(3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="at least one group of two or more tasks"):
        EnsemblePredictor().fit(affinity, singletons, torch.zeros(3, 3, dtype=torch.float64))
    one_pair_group = torch.tensor([[True, True, False]])
    gains = torch.tensor([[0.1, 0.2, 0.0]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"`residual_folds`.*at least 2 samples.*Found 1"):
        EnsemblePredictor(**GRID).fit(affinity, one_pair_group, gains)
    # Two pairs with the same feature: the constant-feature fallback, the mean gain.
    spline = EnsemblePredictor("affine+spline", **GRID).fit(affinity, one_pair_group, gains)
    predicted = spline.predict(one_pair_group)
    assert predicted.flatten().tolist() == pytest.approx([0.15, 0.15, 0.0], abs=1e-15)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"`alphas` should hold finite, non-negative"):
        EnsemblePredictor(alphas=[0.1, -0.5])
    with pytest.raises(RuntimeError, match=r"`residual_alphas` should hold finite"):
        EnsemblePredictor(residual_alphas=[-1.0])
    with pytest.raises(RuntimeError, match=r"`n_folds` should be at least 2"):
        EnsemblePredictor(n_folds=1)
    with pytest.raises(RuntimeError, match=r"`degrees` should hold values of at least 1"):
        EnsemblePredictor(degrees=[0])
    with pytest.raises(ValueError, match=r"Parameter `stages` should be one of"):
        EnsemblePredictor("everything")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"should be fitted before `predict`"):
        EnsemblePredictor().predict(torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("key", ["spline.coef", "residual.intercept", "affinity", "affine.slope"])
def test_load_state_dict_refuses_non_finite_parameters(key):
    groups = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]]).bool()
    gains = torch.tensor([[0.1, 0.2, 0], [0, 0.3, 0.1], [0.05, 0, 0.1], [0.1, 0.2, 0.2]])
    affinity = torch.tensor([[0.0, 0.2, 0.1], [0.3, 0.0, 0.4], [0.1, 0.5, 0.0]])
    state = EnsemblePredictor().fit(affinity, groups, gains).state_dict()
    value = state[key]
    state[key] = value * math.nan if isinstance(value, torch.Tensor) else math.nan
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        EnsemblePredictor().load_state_dict(state)
