"""etap::affinity against a float64 oracle, its exact known values, layouts and errors."""

from __future__ import annotations

import doctest
import random

import pytest
import torch
from affinity_oracle import (
    DEVICES,
    FLOAT_DTYPES,
    LAYOUTS,
    assert_matches_reference,
    expected_dtype,
    random_losses,
    random_tensor,
    reference_affinity,
    reference_magnitude,
)

import etap_torch
from etap_torch import ops

SHAPES = [(), (1,), (7,), (3, 5), (4, 3, 2), (2, 3, 4, 5), (6, 1, 3), (0,), (513,), (33, 40)]


def random_case(
    rng: random.Random, generator: torch.Generator, num_tasks: int, device: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Random grads/updates stacks with random shapes, dtypes and layouts."""
    grads, updates = [], []
    for _ in range(rng.randint(1, 5)):
        shape = (num_tasks, *rng.choice(SHAPES))
        grads.append(
            random_tensor(shape, rng.choice(FLOAT_DTYPES), rng.choice(LAYOUTS), generator, device)
        )
        updates.append(
            random_tensor(shape, rng.choice(FLOAT_DTYPES), rng.choice(LAYOUTS), generator, device)
        )
    return grads, updates, random_losses(num_tasks, generator, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 8, 13])
def test_matches_float64_reference(device: str, num_tasks: int) -> None:
    rng = random.Random(num_tasks)
    generator = torch.Generator().manual_seed(num_tasks)
    for _ in range(12):
        grads, updates, losses = random_case(rng, generator, num_tasks, device)
        result = ops.affinity(grads, updates, losses)
        assert result.dtype == expected_dtype([*grads, *updates], losses)
        assert result.device.type == device
        assert_matches_reference(
            result,
            reference_affinity(grads, updates, losses),
            reference_magnitude(grads, updates, losses),
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_layout_equals_contiguous_copy(device: str, layout: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    shapes = [(4, 3, 5, 7), (4, 130), (4, 2, 3, 4, 5)]
    grads = [random_tensor(s, dtype, layout, generator, device) for s in shapes]
    updates = [random_tensor(s, dtype, layout, generator, device) for s in shapes]
    # A contiguous tensor beside each strided one forces the logical-order path as well.
    updates[1] = updates[1].contiguous()
    losses = random_losses(4, generator, device)

    result = ops.affinity(grads, updates, losses)
    copies = ops.affinity(
        [g.contiguous() for g in grads], [u.contiguous() for u in updates], losses
    )
    magnitude = reference_magnitude(grads, updates, losses)
    assert_matches_reference(result, copies.double().cpu(), magnitude)
    assert_matches_reference(result, reference_affinity(grads, updates, losses), magnitude)


@pytest.mark.parametrize("device", DEVICES)
def test_orientation_rows_are_sources(device: str) -> None:
    # Only source 1's update points along target 0's gradient.
    grads = [torch.tensor([[1.0, 0.0], [0.0, 0.0]], device=device)]
    updates = [torch.tensor([[0.0, 0.0], [3.0, 0.0]], device=device)]
    result = ops.affinity(grads, updates, torch.tensor([2.0, 1.0], device=device))
    expected = torch.tensor([[0.0, 0.0], [1.5, 0.0]])
    assert torch.equal(result.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_ones_sum_exactly(device: str) -> None:
    ones = torch.ones(2, 100_000, dtype=torch.bfloat16, device=device)
    result = ops.affinity([ones], [ones], torch.ones(2, device=device))
    assert torch.equal(result.cpu(), torch.full((2, 2), 100000.0))


@pytest.mark.parametrize("device", DEVICES)
def test_float32_ones_beyond_sequential_precision(device: str) -> None:
    # 2^25 ones, stored as one element expanded (no memory): a sequential float32 sum
    # stalls at 2^24 = 16777216.
    ones = torch.ones(1, 1, device=device).expand(2, 2**25)
    result = ops.affinity([ones], [ones], torch.ones(2, device=device))
    assert torch.equal(result.cpu(), torch.full((2, 2), 33554432.0))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_exact(device: str) -> None:
    # Small multiples of 1/4: every product and every partial sum is exact in float32.
    generator = torch.Generator().manual_seed(3)
    grads, updates = [], []
    for dtype, size in [(torch.float32, 3), (torch.bfloat16, 5), (torch.float16, 2)]:
        for stacks in (grads, updates):
            values = torch.randint(-8, 9, (2, size), generator=generator) / 4
            stacks.append(values.to(dtype=dtype, device=device))
    losses = torch.tensor([1.0, 0.5], device=device)
    result = ops.affinity(grads, updates, losses)
    assert result.dtype == torch.float32
    assert torch.equal(result.cpu().double(), reference_affinity(grads, updates, losses))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_tensors_contribute_nothing(device: str) -> None:
    generator = torch.Generator().manual_seed(5)
    grads = [random_tensor((3, 40), torch.float32, "contiguous", generator, device)]
    updates = [random_tensor((3, 40), torch.float32, "contiguous", generator, device)]
    losses = random_losses(3, generator, device)
    empty = [torch.empty(3, 0, device=device), torch.empty(3, 4, 0, 2, device=device)]

    without = ops.affinity(grads, updates, losses)
    with_empty = ops.affinity([empty[0], *grads, empty[1]], [empty[0], *updates, empty[1]], losses)
    assert torch.equal(without, with_empty)

    all_empty = ops.affinity(empty, empty, losses)
    assert torch.equal(all_empty.cpu(), torch.zeros(3, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_single_task(device: str) -> None:
    grad = torch.tensor([[1.0, 2.0, 3.0]], device=device)
    update = torch.tensor([[0.5, -1.0, 2.0]], device=device)
    result = ops.affinity([grad], [update], torch.tensor([2.0], device=device))
    assert result.shape == (1, 1)
    assert result.item() == pytest.approx((0.5 - 2.0 + 6.0) / 2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_unusable_loss_zeroes_its_column(device: str) -> None:
    generator = torch.Generator().manual_seed(11)
    grads = [random_tensor((5, 9), torch.float32, "contiguous", generator, device)]
    losses = torch.tensor([1.0, float("nan"), 0.0, -2.0, float("inf")], device=device)
    result = ops.affinity(grads, grads, losses).cpu()
    assert torch.equal(result[:, 1:], torch.zeros(5, 4))
    reference = reference_affinity(grads, grads, losses)
    assert torch.allclose(result[:, 0].double(), reference[:, 0], rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_across_runs_and_threads(device: str) -> None:
    generator = torch.Generator().manual_seed(13)
    # Enough elements for many blocks of partial sums.
    grads = [random_tensor((6, 300_001), torch.float32, "contiguous", generator, device)]
    updates = [random_tensor((6, 300_001), torch.bfloat16, "sliced", generator, device)]
    losses = random_losses(6, generator, device)
    first = ops.affinity(grads, updates, losses)
    assert torch.equal(first, ops.affinity(grads, updates, losses))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = ops.affinity(grads, updates, losses)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single_thread)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    generator = torch.Generator().manual_seed(17)
    grads = [
        random_tensor((3, 4, 5), torch.float32, "transposed", generator, device),
        random_tensor((3, 7), torch.bfloat16, "contiguous", generator, device),
    ]
    updates = [
        random_tensor((3, 4, 5), torch.float32, "contiguous", generator, device),
        random_tensor((3, 7), torch.float64, "sliced", generator, device),
    ]
    losses = random_losses(3, generator, device)
    torch.library.opcheck(torch.ops.etap.affinity.default, (grads, updates, losses))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_matches_eager(device: str) -> None:
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def compiled(grads: list[torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
        return ops.affinity(grads, [2.0 * g for g in grads], losses)

    generator = torch.Generator().manual_seed(19)
    for num_tasks in (2, 4):
        grads = [
            random_tensor((num_tasks, 6, 3), torch.float32, "contiguous", generator, device),
            random_tensor((num_tasks, 11), torch.float32, "contiguous", generator, device),
        ]
        losses = random_losses(num_tasks, generator, device)
        eager = ops.affinity(grads, [2.0 * g for g in grads], losses)
        torch.testing.assert_close(compiled(grads, losses), eager, rtol=1e-6, atol=1e-6)


def test_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(ops)
    assert tried > 0
    assert failures == 0


# ---- errors ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ([], [], torch.ones(2, device=d)), r"`grads` should be a non-empty list"),
        (
            lambda d: ([torch.ones(2, 3, device=d)], [], torch.ones(2, device=d)),
            r"`updates` should have one entry per entry of `grads` \(1\)\. Found 0",
        ),
        (
            lambda d: (
                [torch.ones(3, 4, device=d)],
                [torch.ones(3, 4, device=d)],
                torch.ones(2, device=d),
            ),
            r"`grads\[0\]` should be a stack of shape \[T, \*shape\] with T = 2 .* "
            r"Found shape \[3, 4\]",
        ),
        (
            lambda d: (
                [torch.ones(2, 4, device=d)],
                [torch.ones(2, 5, device=d)],
                torch.ones(2, device=d),
            ),
            r"`updates\[0\]` should have shape \[2, 4\] .* Found shape \[2, 5\]",
        ),
        (
            lambda d: (
                [torch.ones(2, 4, dtype=torch.int64, device=d)],
                [torch.ones(2, 4, device=d)],
                torch.ones(2, device=d),
            ),
            r"`grads\[0\]` should have a floating dtype .* Found Long",
        ),
        (
            lambda d: (
                [torch.ones(2, 4, device=d)],
                [torch.ones(2, 4, dtype=torch.bool, device=d)],
                torch.ones(2, device=d),
            ),
            r"`updates\[0\]` should have a floating dtype .* Found Bool",
        ),
        (
            lambda d: (
                [torch.ones(2, 4, device=d)],
                [torch.ones(2, 4, device=d)],
                torch.ones(2, 1, device=d),
            ),
            r"`losses` should have shape \[T\] .* Found shape \[2, 1\]",
        ),
        (
            lambda d: (
                [torch.ones(2, 4, device=d)],
                [torch.ones(2, 4, device=d)],
                torch.tensor(1.0, device=d),
            ),
            r"`losses` should have shape \[T\] .* Found shape \[\]",
        ),
        (
            lambda d: (
                [torch.ones(2, 4, device=d)],
                [torch.ones(2, 4, device=d)],
                torch.ones(2, dtype=torch.int32, device=d),
            ),
            r"`losses` should have a floating dtype .* Found Int",
        ),
    ],
)
def test_rejects_bad_arguments(device: str, make_args, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        ops.affinity(*make_args(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible GPU")
def test_rejects_tensors_on_different_devices() -> None:
    grads = [torch.ones(2, 4, device="cuda")]
    with pytest.raises(RuntimeError, match=r"`grads\[0\]` should be on the device of `losses`"):
        ops.affinity(grads, [torch.ones(2, 4)], torch.ones(2))
    with pytest.raises(RuntimeError, match=r"should be on the device of `losses`"):
        ops.affinity(grads, grads, torch.ones(2))


@pytest.mark.skipif(
    not torch.cuda.is_available() or etap_torch.built_with_cuda(),
    reason="needs a visible GPU and an etap_torch build without CUDA",
)
def test_rejects_cuda_tensors_without_cuda_build() -> None:
    grads = [torch.ones(2, 4, device="cuda")]
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels"):
        ops.affinity(grads, grads, torch.ones(2, device="cuda"))


def test_fake_kernel_checks_the_task_count_of_every_stack():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grads = [torch.randn(3, 4)]
        with pytest.raises(RuntimeError, match=r"grads\[0\]"):
            torch.ops.etap.affinity(grads, grads, torch.ones(2))
