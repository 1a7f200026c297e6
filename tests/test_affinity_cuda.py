"""Properties of the CUDA affinity kernels that only a GPU shows.

The float64 oracle below is written with plain torch on the CPU: the directions are
materialised (for the Adam family by a shadow ``torch.optim`` step per source task) and
multiplied out. Every test skips, with its reason shown, where no GPU or no CUDA build of
the extension is present.
"""

from __future__ import annotations

import copy

import pytest
import torch

import etap_torch

CUDA_READY = torch.cuda.is_available() and etap_torch.built_with_cuda()
pytestmark = pytest.mark.skipif(
    not CUDA_READY,
    reason="needs a visible GPU and etap_torch built with its CUDA kernels",
)

# The kernels' tables hold 64 tensors (generic and SGD) or 36 (Adam), 3 general strided
# layouts and 8 Adam hyperparameter groups; lists longer than that take several launches.
MORE_THAN_ONE_TABLE = 150


def cuda_list(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [None if t is None else t.cuda() for t in tensors]


def reference_affinity(
    grads: list[torch.Tensor], directions: list[torch.Tensor], losses: torch.Tensor
) -> torch.Tensor:
    """Float64 oracle: A[s, t] = sum_k <grads[k][t], directions[k][s]> / losses[t].

    grads[k], directions[k]: [T, *shape_k]; losses: [T]. Columns whose loss is not finite
    or not positive are zero.
    """
    num_tasks = losses.shape[0]
    raw = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for grad, direction in zip(grads, directions, strict=True):
        g = grad.detach().cpu().double().reshape(num_tasks, -1)
        d = direction.detach().cpu().double().reshape(num_tasks, -1)
        raw += d @ g.T
    loss = losses.detach().cpu().double()
    usable = torch.isfinite(loss) & (loss > 0)
    return torch.where(usable, raw / torch.where(usable, loss, 1.0), 0.0)


def adam_directions(
    grad: torch.Tensor,
    param: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None,
    max_exp_avg_sq: torch.Tensor | None,
    *,
    step: int,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
) -> torch.Tensor:
    """Direction per unit learning rate of one Adam/AdamW step on each task's gradient.

    grad: [T, *shape] per-task gradients; param and the moments: [*shape] (None: fresh
    state, which needs step == 0). Returns [T, *shape] in float64, from a shadow step of
    torch.optim with lr = 1.
    """
    optimizer_class = torch.optim.AdamW if decoupled else torch.optim.Adam
    directions = []
    for task_grad in grad.cpu().double():
        shadow = param.detach().cpu().double().clone().requires_grad_(True)
        optimizer = optimizer_class(
            [shadow],
            lr=1.0,
            betas=(0.8, 0.95),
            eps=1e-3,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=False,
        )
        if exp_avg is not None:
            state = {
                "step": torch.tensor(float(step)),
                "exp_avg": exp_avg.cpu().double().clone(),
                "exp_avg_sq": exp_avg_sq.cpu().double().clone(),
            }
            if amsgrad:
                state["max_exp_avg_sq"] = max_exp_avg_sq.cpu().double().clone()
            optimizer.state[shadow] = copy.deepcopy(state)
        before = shadow.detach().clone()
        shadow.grad = task_grad.clone()
        optimizer.step()
        directions.append(before - shadow.detach())
    return torch.stack(directions)


def assert_close_to(result: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    assert result.shape == expected.shape
    scale = expected.abs().max().item() + 1e-30
    torch.testing.assert_close(result.cpu().double(), expected, rtol=rtol, atol=rtol * scale)


def strided_stacks(
    num_tasks: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stacks [T, *shape] in layouts the kernels must walk without copying.

    Returns the same views of the same values on the CPU and on the GPU (a view is taken
    after the move, since moving a non-dense tensor makes it contiguous).
    """

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    bases_and_views = [
        (randn(num_tasks, 7, 5), lambda x: x.transpose(1, 2)),
        (randn(num_tasks, 6, 9), lambda x: x[:, 1:5, ::2]),
        (randn(num_tasks, 3, 4, 5), lambda x: x.contiguous(memory_format=torch.channels_last)),
        (randn(num_tasks, 1, 6), lambda x: x.expand(-1, 4, 6)),
        (randn(11, num_tasks), lambda x: x.T),  # task stride 1, element stride T
        (randn(num_tasks), lambda x: x),
    ]
    on_cpu = [view(base) for base, view in bases_and_views]
    on_gpu = [view(base.cuda()) for base, view in bases_and_views]
    return on_cpu, on_gpu


@pytest.mark.parametrize("num_tasks", [1, 3, 10, 20, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_generic_matches_float64_reference(num_tasks: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(num_tasks)
    grads, grads_gpu = strided_stacks(num_tasks, generator, dtype)
    updates, updates_gpu = strided_stacks(num_tasks, generator, dtype)
    # Strides that differ from the gradients' take the general strided path.
    updates_gpu[0] = updates_gpu[0].contiguous()
    updates_gpu[1] = updates_gpu[1].contiguous()
    losses = torch.rand(num_tasks, generator=generator) + 0.5

    result = torch.ops.etap.affinity(grads_gpu, updates_gpu, losses.cuda())

    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-3}[dtype]
    assert_close_to(result, reference_affinity(grads, updates, losses), rtol)


@pytest.mark.parametrize("num_tasks", [2, 16, 33])
def test_sgd_matches_float64_reference(num_tasks: int) -> None:
    generator = torch.Generator().manual_seed(100 + num_tasks)
    grads, grads_gpu = strided_stacks(num_tasks, generator, torch.float32)
    scales = [0.5 + k for k in range(len(grads))]
    offsets = [
        None if k % 2 else torch.randn(grad.shape[1:], generator=generator)
        for k, grad in enumerate(grads)
    ]
    offsets_gpu = [None if o is None else o.cuda() for o in offsets]
    row = torch.randn(6, generator=generator)
    offsets[3], offsets_gpu[3] = row.expand(4, 6), row.cuda().expand(4, 6)
    losses = torch.rand(num_tasks, generator=generator) + 0.5
    directions = [
        scale * g.double() + (0.0 if offset is None else offset.double())
        for g, scale, offset in zip(grads, scales, offsets, strict=True)
    ]

    result = torch.ops.etap.affinity_sgd(grads_gpu, scales, offsets_gpu, losses.cuda())

    assert result.dtype == torch.float32
    assert_close_to(result, reference_affinity(grads, directions, losses), 1e-4)


@pytest.mark.parametrize("num_tasks", [3, 12, 34])
@pytest.mark.parametrize(
    ("decoupled", "amsgrad", "maximize", "fresh"),
    [
        (False, False, False, False),
        (True, True, False, False),
        (False, True, True, False),
        (True, False, False, True),
    ],
)
def test_adam_matches_shadow_step(
    num_tasks: int, decoupled: bool, amsgrad: bool, maximize: bool, fresh: bool
) -> None:
    generator = torch.Generator().manual_seed(200 + num_tasks)
    grads, grads_gpu = strided_stacks(num_tasks, generator)
    params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, directions = [], [], [], [], []
    step, weight_decay = (0 if fresh else 4), 0.1
    for grad in grads:
        shape = grad.shape[1:]
        param = torch.randn(shape, generator=generator, dtype=torch.float64)
        exp_avg = None if fresh else 0.1 * torch.randn(shape, generator=generator).double()
        exp_avg_sq = None if fresh else torch.rand(shape, generator=generator).double()
        max_exp_avg_sq = None if fresh else exp_avg_sq + torch.rand(shape, generator=generator)
        params.append(param)
        exp_avgs.append(exp_avg)
        exp_avg_sqs.append(exp_avg_sq)
        max_exp_avg_sqs.append(max_exp_avg_sq)
        directions.append(
            adam_directions(
                grad,
                param,
                exp_avg,
                exp_avg_sq,
                max_exp_avg_sq,
                step=step,
                weight_decay=weight_decay,
                decoupled=decoupled,
                amsgrad=amsgrad,
                maximize=maximize,
            )
        )
    losses = torch.rand(num_tasks, generator=generator, dtype=torch.float64) + 0.5
    count = len(grads)

    result = torch.ops.etap.affinity_adam(
        grads_gpu,
        cuda_list(params),
        cuda_list(exp_avgs),
        cuda_list(exp_avg_sqs),
        cuda_list(max_exp_avg_sqs),
        [0.8] * count,
        [0.95] * count,
        [1e-3] * count,
        [weight_decay] * count,
        [float(step)] * count,
        [decoupled] * count,
        [amsgrad] * count,
        [maximize] * count,
        losses.cuda(),
    )

    assert result.dtype == torch.float64
    assert_close_to(result, reference_affinity(grads, directions, losses), 1e-9)


def test_results_are_bitwise_identical_run_to_run() -> None:
    generator = torch.Generator().manual_seed(3)
    shapes = [(512, 1024), (1024,), (64, 3, 3, 3), (2_000_003,)]
    grads = [torch.randn(10, *s, generator=generator).cuda() for s in shapes]
    updates = [torch.randn(10, *s, generator=generator).cuda() for s in shapes]
    losses = torch.rand(10, generator=generator).cuda() + 0.5
    params = [torch.randn(s, generator=generator).cuda() for s in shapes]
    moments = [torch.rand(s, generator=generator).cuda() for s in shapes]
    count = len(shapes)

    def run_all() -> list[torch.Tensor]:
        return [
            torch.ops.etap.affinity(grads, updates, losses),
            torch.ops.etap.affinity_sgd(grads, [0.3] * count, params, losses),
            torch.ops.etap.affinity_adam(
                grads,
                params,
                moments,
                moments,
                [None] * count,
                [0.9] * count,
                [0.999] * count,
                [1e-8] * count,
                [0.0] * count,
                [7.0] * count,
                [False] * count,
                [False] * count,
                [False] * count,
                losses,
            ),
        ]

    first = run_all()
    for _ in range(3):
        for expected, again in zip(first, run_all(), strict=True):
            assert torch.equal(expected, again)


def test_lists_longer_than_one_table() -> None:
    generator = torch.Generator().manual_seed(4)
    num_tasks = 5
    grads, grads_gpu, updates = [], [], []
    for k in range(MORE_THAN_ONE_TABLE):
        size = 1 + (k * 37) % 300
        # Every third tensor takes every other element, so the general strided layouts
        # overflow a table too; the others are dense slices of a wider stack.
        step = 2 if k % 3 == 0 else 1
        base = torch.randn(num_tasks, step * size + 1, generator=generator, dtype=torch.float64)
        grads.append(base[:, 1::step])
        grads_gpu.append(base.cuda()[:, 1::step])
        updates.append(torch.randn(num_tasks, size, generator=generator, dtype=torch.float64))
    losses = torch.rand(num_tasks, generator=generator, dtype=torch.float64) + 0.5
    scales = [0.1 * (k % 7) for k in range(MORE_THAN_ONE_TABLE)]
    expected_sgd = reference_affinity(
        grads, [s * g for s, g in zip(scales, grads, strict=True)], losses
    )

    result = torch.ops.etap.affinity(grads_gpu, cuda_list(updates), losses.cuda())
    result_sgd = torch.ops.etap.affinity_sgd(
        grads_gpu, scales, [None] * MORE_THAN_ONE_TABLE, losses.cuda()
    )

    assert_close_to(result, reference_affinity(grads, updates, losses), 1e-10)
    assert_close_to(result_sgd, expected_sgd, 1e-10)


def test_adam_with_more_groups_and_tensors_than_one_table() -> None:
    generator = torch.Generator().manual_seed(5)
    num_tasks, count = 4, 45
    grads, params, exp_avgs, exp_avg_sqs, directions, steps = [], [], [], [], [], []
    for k in range(count):
        shape = (3 + k % 5, 2)
        grad = torch.randn(num_tasks, *shape, generator=generator, dtype=torch.float64)
        param = torch.randn(shape, generator=generator, dtype=torch.float64)
        exp_avg = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
        exp_avg_sq = torch.rand(shape, generator=generator, dtype=torch.float64)
        step = 1 + k % 11  # eleven distinct hyperparameter groups
        grads.append(grad)
        params.append(param)
        exp_avgs.append(exp_avg)
        exp_avg_sqs.append(exp_avg_sq)
        steps.append(float(step))
        directions.append(
            adam_directions(
                grad,
                param,
                exp_avg,
                exp_avg_sq,
                None,
                step=step,
                weight_decay=0.0,
                decoupled=False,
                amsgrad=False,
                maximize=False,
            )
        )
    losses = torch.rand(num_tasks, generator=generator, dtype=torch.float64) + 0.5

    result = torch.ops.etap.affinity_adam(
        cuda_list(grads),
        cuda_list(params),
        cuda_list(exp_avgs),
        cuda_list(exp_avg_sqs),
        [None] * count,
        [0.8] * count,
        [0.95] * count,
        [1e-3] * count,
        [0.0] * count,
        steps,
        [False] * count,
        [False] * count,
        [False] * count,
        losses.cuda(),
    )

    assert_close_to(result, reference_affinity(grads, directions, losses), 1e-9)


def test_mixed_dtypes_in_one_launch() -> None:
    generator = torch.Generator().manual_seed(6)
    num_tasks = 6
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float16, torch.float32]
    # Small integers are exact in every dtype, so the float64 oracle sees the same values.
    grads = [
        torch.randint(-4, 5, (num_tasks, 1000 + k), generator=generator).to(dtype)
        for k, dtype in enumerate(dtypes)
    ]
    updates = [
        torch.randint(-4, 5, (num_tasks, 1000 + k), generator=generator).to(dtypes[-1 - k])
        for k in range(len(dtypes))
    ]
    losses = torch.tensor([1.0, 2.0, 4.0, 0.5, 8.0, 1.0])

    result = torch.ops.etap.affinity(cuda_list(grads), cuda_list(updates), losses.cuda())

    assert result.dtype == torch.float32
    torch.testing.assert_close(
        result.cpu().double(), reference_affinity(grads, updates, losses), rtol=0, atol=0
    )

    grads.append(torch.randn(num_tasks, 77, generator=generator, dtype=torch.float64))
    updates.append(torch.randn(num_tasks, 77, generator=generator, dtype=torch.float64))
    result = torch.ops.etap.affinity(cuda_list(grads), cuda_list(updates), losses.cuda())
    assert result.dtype == torch.float64
    assert_close_to(result, reference_affinity(grads, updates, losses), 1e-12)


def test_a_tensor_spanning_many_tiles_sums_exactly() -> None:
    ones = torch.ones(2, 2**25, device="cuda")
    result = torch.ops.etap.affinity([ones], [ones], torch.ones(2, device="cuda"))
    assert torch.equal(result.cpu(), torch.full((2, 2), 33554432.0))

    ones = torch.ones(2, 100_000, device="cuda", dtype=torch.bfloat16)
    result = torch.ops.etap.affinity_sgd([ones], [1.0], [None], torch.ones(2, device="cuda"))
    assert torch.equal(result.cpu(), torch.full((2, 2), 100000.0))


def test_columns_of_unusable_losses_are_zero() -> None:
    generator = torch.Generator().manual_seed(7)
    grads = [torch.randn(4, 300, generator=generator, dtype=torch.float64)]
    losses = torch.tensor([1.0, float("nan"), -2.0, float("inf")], dtype=torch.float64)

    result = torch.ops.etap.affinity_sgd(cuda_list(grads), [1.0], [None], losses.cuda())

    assert_close_to(result, reference_affinity(grads, grads, losses), 1e-12)
    assert torch.equal(result[:, 1:].cpu(), torch.zeros(4, 3, dtype=torch.float64))


def test_elements_beyond_32_bit_offsets() -> None:
    free, _ = torch.cuda.mem_get_info()
    numel = 2**31 + 64
    if free < 3 * 2 * numel:
        pytest.skip(f"needs {3 * 2 * numel / 2**30:.1f} GiB of free GPU memory")
    grad = torch.zeros(1, numel, dtype=torch.float16, device="cuda")
    grad[0, -3:] = torch.tensor([1.0, 2.0, 3.0])
    grad[0, 5] = 0.5
    offset = torch.zeros(numel, dtype=torch.float16, device="cuda")
    offset[-1] = 4.0

    result = torch.ops.etap.affinity_sgd([grad], [2.0], [offset], torch.ones(1, device="cuda"))

    # 2 * (0.25 + 1 + 4 + 9) + 3 * 4: wrong 32-bit offsets would miss the tail.
    assert result.item() == 2 * (0.25 + 1 + 4 + 9) + 12
