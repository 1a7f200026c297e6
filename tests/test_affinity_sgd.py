"""etap::affinity_sgd (directions scale * g_s + offset) against a float64 oracle."""

from __future__ import annotations

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

from etap_torch import ops

SHAPES = [(), (5,), (3, 4), (2, 3, 4, 5), (0,), (600,), (17, 31)]


def sgd_directions(
    grads: list[torch.Tensor], scales: list[float], offsets: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """The float64 directions scales[k] * grads[k][s] + offsets[k], materialised."""
    directions = []
    for grad, scale, offset in zip(grads, scales, offsets, strict=True):
        direction = scale * grad.detach().cpu().double()
        if offset is not None:
            direction = direction + offset.detach().cpu().double()
        directions.append(direction)
    return directions


def random_case(rng: random.Random, generator: torch.Generator, num_tasks: int, device: str):
    grads, scales, offsets = [], [], []
    for _ in range(rng.randint(1, 5)):
        shape = rng.choice(SHAPES)
        grads.append(
            random_tensor(
                (num_tasks, *shape),
                rng.choice(FLOAT_DTYPES),
                rng.choice(LAYOUTS),
                generator,
                device,
            )
        )
        scales.append(rng.choice([1.0, 0.5, -2.0, 0.0, 1.7]))
        offset = None
        if rng.random() < 0.7:
            offset = random_tensor(
                shape, rng.choice(FLOAT_DTYPES), rng.choice(LAYOUTS), generator, device
            )
        offsets.append(offset)
    return grads, scales, offsets, random_losses(num_tasks, generator, device)


def check_against_oracle(grads, scales, offsets, losses) -> torch.Tensor:
    result = ops.affinity_sgd(grads, scales, offsets, losses)
    directions = sgd_directions(grads, scales, offsets)
    assert result.dtype == expected_dtype([*grads, *offsets], losses)
    assert_matches_reference(
        result,
        reference_affinity(grads, directions, losses),
        reference_magnitude(grads, directions, losses),
    )
    return result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tasks", [1, 2, 4, 7, 10, 16])
def test_matches_float64_reference(device: str, num_tasks: int) -> None:
    rng = random.Random(100 + num_tasks)
    generator = torch.Generator().manual_seed(100 + num_tasks)
    for _ in range(10):
        check_against_oracle(*random_case(rng, generator, num_tasks, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(device: str, layout: str) -> None:
    generator = torch.Generator().manual_seed(21)
    grads = [
        random_tensor((3, 6, 5, 2), torch.float32, layout, generator, device),
        random_tensor((3, 2, 3, 4, 5), torch.bfloat16, layout, generator, device),
    ]
    offsets = [
        random_tensor((6, 5, 2), torch.float32, layout, generator, device),
        random_tensor((2, 3, 4, 5), torch.float32, "contiguous", generator, device),
    ]
    check_against_oracle(grads, [0.3, -1.0], offsets, random_losses(3, generator, device))


@pytest.mark.parametrize("device", DEVICES)
def test_orientation_rows_are_sources(device: str) -> None:
    # Directions d_s = g_s + c with c = (0, 1): A[s, t] = <g_t, g_s + c>.
    grads = [torch.tensor([[1.0, 0.0], [0.0, 2.0]], device=device)]
    offsets = [torch.tensor([0.0, 1.0], device=device)]
    result = ops.affinity_sgd(grads, [1.0], offsets, torch.ones(2, device=device))
    assert torch.equal(result.cpu(), torch.tensor([[1.0, 2.0], [0.0, 6.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_known_exact_values(device: str) -> None:
    ones = torch.ones(2, 100_000, dtype=torch.bfloat16, device=device)
    result = ops.affinity_sgd([ones], [1.0], [None], torch.ones(2, device=device))
    assert torch.equal(result.cpu(), torch.full((2, 2), 100000.0))

    ones = torch.ones(1, 1, device=device).expand(2, 2**25)
    offset = torch.zeros(1, device=device).expand(2**25)
    result = ops.affinity_sgd([ones], [1.0], [offset], torch.ones(2, device=device))
    assert torch.equal(result.cpu(), torch.full((2, 2), 33554432.0))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_exact(device: str) -> None:
    generator = torch.Generator().manual_seed(23)
    grads, offsets = [], []
    for dtype, size in [(torch.float32, 3), (torch.bfloat16, 5), (torch.float16, 2)]:
        grads.append((torch.randint(-8, 9, (2, size), generator=generator) / 4).to(dtype))
        offsets.append((torch.randint(-8, 9, (size,), generator=generator) / 4).to(dtype))
    grads = [g.to(device) for g in grads]
    offsets = [o.to(device) for o in offsets]
    losses = torch.tensor([1.0, 0.25], device=device)
    result = ops.affinity_sgd(grads, [0.5, 1.0, -2.0], offsets, losses)
    expected = reference_affinity(grads, sgd_directions(grads, [0.5, 1.0, -2.0], offsets), losses)
    assert torch.equal(result.cpu().double(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_and_single_task(device: str) -> None:
    generator = torch.Generator().manual_seed(29)
    grads = [random_tensor((2, 30), torch.float32, "contiguous", generator, device)]
    offsets = [random_tensor((30,), torch.float32, "contiguous", generator, device)]
    losses = random_losses(2, generator, device)
    empty_grad = torch.empty(2, 0, 3, device=device)
    empty_offset = torch.empty(0, 3, device=device)
    without = ops.affinity_sgd(grads, [0.5], offsets, losses)
    with_empty = ops.affinity_sgd(
        [empty_grad, *grads], [3.0, 0.5], [empty_offset, *offsets], losses
    )
    assert torch.equal(without, with_empty)
    all_empty = ops.affinity_sgd([empty_grad], [1.0], [empty_offset], losses)
    assert torch.equal(all_empty.cpu(), torch.zeros(2, 2))

    single = check_against_oracle([grads[0][:1]], [2.0], offsets, losses[:1])
    assert single.shape == (1, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_unusable_loss_zeroes_its_column(device: str) -> None:
    generator = torch.Generator().manual_seed(31)
    grads = [random_tensor((3, 8), torch.float32, "contiguous", generator, device)]
    losses = torch.tensor([float("-inf"), 1.0, 0.0], device=device)
    result = ops.affinity_sgd(grads, [1.0], [None], losses).cpu()
    assert torch.equal(result[:, [0, 2]], torch.zeros(3, 2))
    assert result[:, 1].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    generator = torch.Generator().manual_seed(37)
    grads = [
        random_tensor((3, 4, 5), torch.float32, "transposed", generator, device),
        random_tensor((3, 6), torch.float16, "contiguous", generator, device),
    ]
    offsets = [random_tensor((4, 5), torch.float32, "expanded", generator, device), None]
    losses = random_losses(3, generator, device)
    torch.library.opcheck(
        torch.ops.etap.affinity_sgd.default, (grads, [0.9, -1.0], offsets, losses)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_matches_eager(device: str) -> None:
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def compiled(grads: list[torch.Tensor], offsets: list[torch.Tensor], losses: torch.Tensor):
        return ops.affinity_sgd(grads, [0.5, 2.0], offsets, losses)

    generator = torch.Generator().manual_seed(41)
    for num_tasks in (2, 4):
        grads = [
            random_tensor((num_tasks, 5, 2), torch.float32, "contiguous", generator, device),
            random_tensor((num_tasks, 9), torch.float32, "contiguous", generator, device),
        ]
        offsets = [
            random_tensor((5, 2), torch.float32, "contiguous", generator, device),
            random_tensor((9,), torch.float32, "contiguous", generator, device),
        ]
        losses = random_losses(num_tasks, generator, device)
        eager = ops.affinity_sgd(grads, [0.5, 2.0], offsets, losses)
        torch.testing.assert_close(compiled(grads, offsets, losses), eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ([], [], [], torch.ones(2, device=d)), r"`grads` should be a non-empty list"),
        (
            lambda d: ([torch.ones(2, 3, device=d)], [1.0, 2.0], [None], torch.ones(2, device=d)),
            r"`scales` should have one entry per entry of `grads` \(1\)\. Found 2",
        ),
        (
            lambda d: ([torch.ones(2, 3, device=d)], [1.0], [], torch.ones(2, device=d)),
            r"`offsets` should have one entry per entry of `grads` \(1\)\. Found 0",
        ),
        (
            lambda d: ([torch.ones(3, 3, device=d)], [1.0], [None], torch.ones(2, device=d)),
            r"`grads\[0\]` should be a stack of shape \[T, \*shape\] with T = 2",
        ),
        (
            lambda d: (
                [torch.ones(2, 3, device=d)],
                [1.0],
                [torch.ones(4, device=d)],
                torch.ones(2, device=d),
            ),
            r"`offsets\[0\]` should have shape \[3\] .* Found shape \[4\]",
        ),
        (
            lambda d: (
                [torch.ones(2, 3, device=d)],
                [1.0],
                [torch.ones(3, dtype=torch.int32, device=d)],
                torch.ones(2, device=d),
            ),
            r"`offsets\[0\]` should have a floating dtype .* Found Int",
        ),
        (
            lambda d: (
                [torch.ones(2, 3, device=d)],
                [float("nan")],
                [None],
                torch.ones(2, device=d),
            ),
            r"`scales\[0\]` should be a finite number",
        ),
        (
            lambda d: ([torch.ones(2, 3, device=d)], [1.0], [None], torch.ones(1, 2, device=d)),
            r"`losses` should have shape \[T\]",
        ),
    ],
)
def test_rejects_bad_arguments(device: str, make_args, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        ops.affinity_sgd(*make_args(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible GPU")
def test_rejects_tensors_on_different_devices() -> None:
    grads = [torch.ones(2, 4, device="cuda")]
    with pytest.raises(RuntimeError, match=r"`offsets\[0\]` should be on the device of `losses`"):
        ops.affinity_sgd(grads, [1.0], [torch.ones(4)], torch.ones(2, device="cuda"))
