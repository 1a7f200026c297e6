"""group_affinity against a brute-force loop over groups and members."""

from __future__ import annotations

import pytest
import torch

from etap_torch import group_affinity


def brute_force(affinity: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    features = torch.zeros(groups.shape, dtype=torch.float64)
    for row in range(groups.shape[0]):
        members = [t for t in range(groups.shape[1]) if groups[row, t]]
        if len(members) < 2:
            continue
        for target in members:
            sources = [s for s in members if s != target]
            features[row, target] = sum(float(affinity[s, target]) for s in sources) / len(sources)
    return features


def random_groups(num_groups: int, num_tasks: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_groups, num_tasks, generator=generator) < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_tasks", [1, 2, 5, 9])
def test_matches_brute_force(dtype: torch.dtype, num_tasks: int) -> None:
    affinity = torch.randn(num_tasks, num_tasks, dtype=dtype)
    groups = random_groups(17, num_tasks, seed=num_tasks)
    result = group_affinity(affinity, groups)
    assert result.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(
        result.double(), brute_force(affinity.double(), groups), rtol=tolerance, atol=tolerance
    )


def test_orientation_reads_source_rows_onto_target_columns() -> None:
    affinity = torch.tensor([[0.0, 1.0, 2.0], [10.0, 0.0, 20.0], [100.0, 200.0, 0.0]])
    result = group_affinity(affinity, torch.tensor([[True, True, True]]))
    # Target 0 is helped by sources 1 and 2: (A[1, 0] + A[2, 0]) / 2.
    assert result.tolist() == [[55.0, 100.5, 11.0]]


def test_singletons_non_members_and_diagonal_are_ignored() -> None:
    affinity = torch.full((3, 3), 7.0)
    affinity.fill_diagonal_(float("inf"))
    groups = torch.tensor([[True, False, False], [False, False, False], [True, True, False]])
    result = group_affinity(affinity, groups)
    assert result.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [7.0, 7.0, 0.0]]


def test_non_contiguous_and_empty_inputs() -> None:
    affinity = torch.randn(6, 6, dtype=torch.float64).t()
    groups = random_groups(8, 12, seed=3)[:, ::2]
    assert not affinity.is_contiguous() and not groups.is_contiguous()
    torch.testing.assert_close(group_affinity(affinity, groups), brute_force(affinity, groups))
    assert group_affinity(affinity, groups[:0]).shape == (0, 6)


def test_gradient_matches_finite_differences() -> None:
    affinity = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    groups = random_groups(6, 4, seed=5)
    assert torch.autograd.gradcheck(lambda a: group_affinity(a, groups), (affinity,))


@pytest.mark.parametrize(
    ("affinity", "groups", "message"),
    [
        (torch.zeros(3, 4), torch.ones(2, 3, dtype=torch.bool), "square matrix"),
        (torch.zeros(3, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), "floating"),
        (torch.zeros(3, 3), torch.ones(2, 4, dtype=torch.bool), r"\[N, T\] with T = 3"),
        (torch.zeros(3, 3), torch.ones(2, 3, dtype=torch.long), "bool membership"),
    ],
)
def test_rejects_bad_inputs(affinity: torch.Tensor, groups: torch.Tensor, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        group_affinity(affinity, groups)


def test_opcheck() -> None:
    affinity = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    groups = random_groups(7, 5, seed=11)
    torch.library.opcheck(torch.ops.etap.group_affinity.default, (affinity, groups))
    torch.library.opcheck(
        torch.ops.etap.group_affinity.default, (affinity.detach().float(), groups)
    )


def test_compiles() -> None:
    affinity = torch.randn(5, 5, dtype=torch.float64)
    groups = random_groups(7, 5, seed=2)
    compiled = torch.compile(group_affinity, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(affinity, groups), brute_force(affinity, groups))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    affinity = torch.randn(6, 6, dtype=torch.float64)
    groups = random_groups(9, 6, seed=4)
    result = group_affinity(affinity.cuda(), groups.cuda())
    torch.testing.assert_close(result.cpu(), brute_force(affinity, groups))
