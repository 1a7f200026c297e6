"""The B-spline basis against scikit-learn's SplineTransformer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.preprocessing import SplineTransformer

from etap_torch.ensemble import spline_basis


@pytest.mark.parametrize("degree", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("n_knots", [2, 3, 7, 15])
def test_matches_spline_transformer(degree: int, n_knots: int) -> None:
    rng = np.random.default_rng(degree * 100 + n_knots)
    fit_values = rng.normal(0.3, 2.0, 40)
    # Inside the range, on the knots and at both ends, and beyond on both sides.
    values = np.concatenate(
        [
            np.linspace(fit_values.min() - 3.0, fit_values.max() + 3.0, 301),
            np.linspace(fit_values.min(), fit_values.max(), n_knots),
            rng.normal(0.3, 4.0, 50),
        ]
    )
    transformer = SplineTransformer(
        degree=degree, n_knots=n_knots, knots="uniform", extrapolation="constant"
    ).fit(fit_values[:, None])
    expected = transformer.transform(values[:, None])
    basis = spline_basis(torch.from_numpy(fit_values), torch.from_numpy(values), degree, n_knots)
    assert basis.shape == (len(values), n_knots + degree - 1)
    np.testing.assert_allclose(basis.numpy(), expected, rtol=0, atol=1e-12)


def test_constant_feature_gives_the_zero_basis_as_scikit_learn() -> None:
    fit_values = torch.ones(5, dtype=torch.float64)
    values = torch.tensor([-1.0, 1.0, 3.0], dtype=torch.float64)
    expected = SplineTransformer(degree=3, n_knots=4).fit(fit_values[:, None].numpy())
    basis = spline_basis(fit_values, values, 3, 4)
    np.testing.assert_array_equal(basis.numpy(), expected.transform(values[:, None].numpy()))
    assert not basis.isnan().any()


def test_rejects_bad_arguments() -> None:
    values = torch.linspace(0, 1, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="`n_knots` should be at least 2"):
        spline_basis(values, values, 3, 1)
    with pytest.raises(RuntimeError, match="`degree` should be in"):
        spline_basis(values, values, 0, 4)
    with pytest.raises(RuntimeError, match=r"`values` should be finite. Found nan at row 0, col"):
        spline_basis(values, torch.tensor([float("nan")], dtype=torch.float64), 3, 4)
