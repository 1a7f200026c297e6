"""etap::affinity_adam against shadow torch.optim.Adam / AdamW steps in float64."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch
from affinity_oracle import (
    DEVICES,
    LAYOUTS,
    assert_matches_reference,
    expected_dtype,
    random_losses,
    random_tensor,
    reference_affinity,
    reference_magnitude,
)

from etap_torch import ops


@dataclass
class AdamParameter:
    """One shared parameter with its per-task gradients, state and group settings."""

    grad: torch.Tensor  # [T, *shape]
    param: torch.Tensor  # shape
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    max_exp_avg_sq: torch.Tensor | None
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    step: int = 0
    decoupled: bool = False
    amsgrad: bool = False
    maximize: bool = False


def float64_state(tensor: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy of an optimizer state tensor; zeros for a missing one."""
    if tensor is None:
        return torch.zeros_like(param)
    return tensor.detach().cpu().double().clone()


def shadow_directions(parameter: AdamParameter) -> torch.Tensor:
    """[T, *shape] float64: for each source task, torch.optim's displacement / lr after one
    step from a copy of the state with that task's gradient as the only gradient."""
    learning_rate = 0.5
    directions = []
    for task_grad in parameter.grad.detach().cpu().double():
        param = parameter.param.detach().cpu().double().clone().requires_grad_(True)
        optimizer_class = torch.optim.AdamW if parameter.decoupled else torch.optim.Adam
        optimizer = optimizer_class(
            [param],
            lr=learning_rate,
            betas=(parameter.beta1, parameter.beta2),
            eps=parameter.eps,
            weight_decay=parameter.weight_decay,
            amsgrad=parameter.amsgrad,
            maximize=parameter.maximize,
            foreach=False,
        )
        if parameter.step > 0 or parameter.exp_avg is not None:
            optimizer.state[param] = {
                "step": torch.tensor(float(parameter.step), dtype=torch.float64),
                "exp_avg": float64_state(parameter.exp_avg, param),
                "exp_avg_sq": float64_state(parameter.exp_avg_sq, param),
            }
            if parameter.amsgrad:
                optimizer.state[param]["max_exp_avg_sq"] = float64_state(
                    parameter.max_exp_avg_sq, param
                )
        before = param.detach().clone()
        param.grad = task_grad.clone()
        optimizer.step()
        directions.append((before - param.detach()) / learning_rate)
    return torch.stack(directions)


def call_op(parameters: list[AdamParameter], losses: torch.Tensor) -> torch.Tensor:
    return ops.affinity_adam(
        [p.grad for p in parameters],
        [p.param for p in parameters],
        [p.exp_avg for p in parameters],
        [p.exp_avg_sq for p in parameters],
        [p.max_exp_avg_sq for p in parameters],
        [p.beta1 for p in parameters],
        [p.beta2 for p in parameters],
        [p.eps for p in parameters],
        [p.weight_decay for p in parameters],
        [float(p.step) for p in parameters],
        [p.decoupled for p in parameters],
        [p.amsgrad for p in parameters],
        [p.maximize for p in parameters],
        losses,
    )


def check_against_shadow(parameters: list[AdamParameter], losses: torch.Tensor) -> torch.Tensor:
    result = call_op(parameters, losses)
    grads = [p.grad for p in parameters]
    directions = [shadow_directions(p) for p in parameters]
    read = [p.param for p in parameters] + [p.exp_avg for p in parameters]
    read += [p.exp_avg_sq for p in parameters]
    read += [p.max_exp_avg_sq for p in parameters if p.amsgrad]
    assert result.dtype == expected_dtype([*grads, *read], losses)
    assert_matches_reference(
        result,
        reference_affinity(grads, directions, losses),
        reference_magnitude(grads, directions, losses),
    )
    return result


def random_parameter(
    shape: tuple[int, ...],
    num_tasks: int,
    generator: torch.Generator,
    device: str,
    *,
    dtype: torch.dtype = torch.float64,
    layout: str = "contiguous",
    fresh: bool = False,
    **settings,
) -> AdamParameter:
    """Gradients, parameter and a plausible state (v >= m^2 scale, v_max >= v)."""
    grad = random_tensor((num_tasks, *shape), dtype, layout, generator, device)
    param = random_tensor(shape, dtype, layout, generator, device)
    if fresh:
        return AdamParameter(grad, param, None, None, None, **settings)
    exp_avg = 0.1 * random_tensor(shape, dtype, layout, generator, device)
    exp_avg_sq = random_tensor(shape, dtype, layout, generator, device).abs() * 0.01 + 1e-4
    max_exp_avg_sq = (
        exp_avg_sq + random_tensor(shape, dtype, layout, generator, device).abs() * 0.01
    )
    return AdamParameter(grad, param, exp_avg, exp_avg_sq, max_exp_avg_sq, **settings)


SETTINGS = list(itertools.product([0.0, 0.1], [False, True], [False, True], [False, True], [0, 7]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("weight_decay", "decoupled", "amsgrad", "maximize", "step"),
    SETTINGS,
    ids=[f"wd{w}-dec{int(d)}-ams{int(a)}-max{int(m)}-step{s}" for w, d, a, m, s in SETTINGS],
)
def test_matches_shadow_optimizer_float64(
    device: str, weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool, step: int
) -> None:
    generator = torch.Generator().manual_seed(hash((weight_decay, decoupled, amsgrad)) % 1000)
    settings = dict(
        weight_decay=weight_decay,
        decoupled=decoupled,
        amsgrad=amsgrad,
        maximize=maximize,
        step=step,
    )
    parameters = [
        random_parameter((5, 3), 4, generator, device, **settings),
        random_parameter((11,), 4, generator, device, beta1=0.8, beta2=0.99, eps=1e-6, **settings),
        random_parameter((2, 2, 3), 4, generator, device, fresh=step == 0, **settings),
    ]
    check_against_shadow(parameters, random_losses(4, generator, device).double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 10])
def test_mixed_groups_dtypes_and_layouts(device: str, num_tasks: int) -> None:
    rng = random.Random(num_tasks)
    generator = torch.Generator().manual_seed(200 + num_tasks)
    for _ in range(4):
        parameters = []
        for _ in range(rng.randint(1, 4)):
            shape = rng.choice([(), (6,), (3, 7), (2, 3, 4, 5), (0, 4), (700,)])
            parameters.append(
                random_parameter(
                    shape,
                    num_tasks,
                    generator,
                    device,
                    dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]),
                    layout=rng.choice(LAYOUTS),
                    fresh=rng.random() < 0.3,
                    weight_decay=rng.choice([0.0, 0.01]),
                    decoupled=rng.random() < 0.5,
                    amsgrad=rng.random() < 0.5,
                    maximize=rng.random() < 0.3,
                    step=rng.choice([0, 1, 100]),
                    beta2=rng.choice([0.999, 0.95]),
                )
            )
        check_against_shadow(parameters, random_losses(num_tasks, generator, device))


@pytest.mark.parametrize("device", DEVICES)
def test_orientation_rows_are_sources(device: str) -> None:
    # Fresh state: the first Adam step moves each element by sign(g) (eps aside).
    grads = torch.tensor([[3.0, 0.0], [-2.0, 5.0]], device=device)
    parameter = AdamParameter(grads, torch.zeros(2, device=device), None, None, None)
    result = call_op([parameter], torch.ones(2, device=device))
    # d_0 = (1, 0), d_1 = (-1, 1): A[s, t] = <g_t, d_s>.
    expected = torch.tensor([[3.0, -2.0], [-3.0, 7.0]])
    torch.testing.assert_close(result.cpu(), expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_and_unusable_losses(device: str) -> None:
    generator = torch.Generator().manual_seed(43)
    parameters = [random_parameter((9,), 3, generator, device, dtype=torch.float32)]
    empty = random_parameter((0, 2), 3, generator, device, dtype=torch.float32)
    losses = torch.tensor([1.0, float("nan"), 0.5], device=device)
    without = call_op(parameters, losses)
    assert torch.equal(without, call_op([empty, *parameters], losses))
    assert torch.equal(without[:, 1].cpu(), torch.zeros(3))
    assert torch.equal(call_op([empty], losses).cpu(), torch.zeros(3, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_across_threads(device: str) -> None:
    generator = torch.Generator().manual_seed(47)
    parameters = [
        random_parameter(
            (200_003,), 5, generator, device, dtype=torch.float32, amsgrad=True, weight_decay=0.01
        )
    ]
    losses = random_losses(5, generator, device)
    first = call_op(parameters, losses)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = call_op(parameters, losses)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single_thread)


def adam_args(parameters: list[AdamParameter], losses: torch.Tensor) -> tuple:
    return (
        [p.grad for p in parameters],
        [p.param for p in parameters],
        [p.exp_avg for p in parameters],
        [p.exp_avg_sq for p in parameters],
        [p.max_exp_avg_sq for p in parameters],
        [p.beta1 for p in parameters],
        [p.beta2 for p in parameters],
        [p.eps for p in parameters],
        [p.weight_decay for p in parameters],
        [float(p.step) for p in parameters],
        [p.decoupled for p in parameters],
        [p.amsgrad for p in parameters],
        [p.maximize for p in parameters],
        losses,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    generator = torch.Generator().manual_seed(53)
    parameters = [
        random_parameter(
            (4, 3),
            3,
            generator,
            device,
            dtype=torch.float32,
            layout="transposed",
            amsgrad=True,
            weight_decay=0.1,
            step=3,
        ),
        random_parameter((5,), 3, generator, device, dtype=torch.bfloat16, fresh=True),
    ]
    losses = random_losses(3, generator, device)
    torch.library.opcheck(torch.ops.etap.affinity_adam.default, adam_args(parameters, losses))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_matches_eager(device: str) -> None:
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def compiled(grads, params, exp_avgs, exp_avg_sqs, losses):
        return ops.affinity_adam(
            grads,
            params,
            exp_avgs,
            exp_avg_sqs,
            [None, None],
            [0.9, 0.9],
            [0.999, 0.99],
            [1e-8, 1e-8],
            [0.0, 0.1],
            [3.0, 3.0],
            [False, True],
            [False, False],
            [False, False],
            losses,
        )

    generator = torch.Generator().manual_seed(59)
    for num_tasks in (2, 4):
        parameters = [
            random_parameter((3, 4), num_tasks, generator, device, dtype=torch.float32),
            random_parameter((7,), num_tasks, generator, device, dtype=torch.float32),
        ]
        losses = random_losses(num_tasks, generator, device)
        args = (
            [p.grad for p in parameters],
            [p.param for p in parameters],
            [p.exp_avg for p in parameters],
            [p.exp_avg_sq for p in parameters],
            losses,
        )
        eager = ops.affinity_adam(
            args[0],
            args[1],
            args[2],
            args[3],
            [None, None],
            [0.9, 0.9],
            [0.999, 0.99],
            [1e-8, 1e-8],
            [0.0, 0.1],
            [3.0, 3.0],
            [False, True],
            [False, False],
            [False, False],
            losses,
        )
        torch.testing.assert_close(compiled(*args), eager, rtol=1e-6, atol=1e-6)


def bad_case(device: str, **changes) -> tuple:
    """Valid arguments for two parameters with `changes` applied by argument name."""
    grads = [torch.ones(2, 3, device=device), torch.ones(2, 4, device=device)]
    arguments = dict(
        grads=grads,
        params=[torch.ones(3, device=device), torch.ones(4, device=device)],
        exp_avgs=[None, None],
        exp_avg_sqs=[None, None],
        max_exp_avg_sqs=[None, None],
        beta1=[0.9, 0.9],
        beta2=[0.999, 0.999],
        eps=[1e-8, 1e-8],
        weight_decay=[0.0, 0.0],
        step=[0.0, 0.0],
        decoupled=[False, False],
        amsgrad=[False, False],
        maximize=[False, False],
        losses=torch.ones(2, device=device),
    )
    arguments.update({k: v(device) if callable(v) else v for k, v in changes.items()})
    return tuple(arguments.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(grads=[], params=[]), r"`grads` should be a non-empty list"),
        *[
            (
                {name: [value]},
                rf"`{name}` should have one entry per entry of `grads` \(2\)\. Found 1",
            )
            for name, value in [
                ("exp_avgs", None),
                ("exp_avg_sqs", None),
                ("max_exp_avg_sqs", None),
                ("beta1", 0.9),
                ("beta2", 0.9),
                ("eps", 0.1),
                ("weight_decay", 0.0),
                ("step", 0.0),
                ("decoupled", False),
                ("amsgrad", False),
                ("maximize", False),
            ]
        ],
        (
            dict(params=lambda d: [torch.ones(3, device=d)]),
            r"`params` should have one entry per entry of `grads` \(2\)\. Found 1",
        ),
        (
            dict(params=lambda d: [torch.ones(3, device=d), torch.ones(5, device=d)]),
            r"`params\[1\]` should have shape \[4\] .* Found shape \[5\]",
        ),
        (
            dict(exp_avgs=lambda d: [torch.ones(2, 3, device=d), None]),
            r"`exp_avgs\[0\]` should have shape \[3\] .* Found shape \[2, 3\]",
        ),
        (
            dict(exp_avg_sqs=lambda d: [None, torch.ones(3, device=d)]),
            r"`exp_avg_sqs\[1\]` should have shape \[4\]",
        ),
        (
            dict(max_exp_avg_sqs=lambda d: [torch.ones(1, device=d), None], amsgrad=[True, False]),
            r"`max_exp_avg_sqs\[0\]` should have shape \[3\]",
        ),
        (
            dict(exp_avgs=lambda d: [None, torch.ones(4, dtype=torch.int64, device=d)]),
            r"`exp_avgs\[1\]` should have a floating dtype .* Found Long",
        ),
        (
            dict(grads=lambda d: [torch.ones(3, 3, device=d), torch.ones(2, 4, device=d)]),
            r"`grads\[0\]` should be a stack of shape \[T, \*shape\] with T = 2",
        ),
        (dict(beta1=[0.9, 1.0]), r"`beta1\[1\]` should lie in \[0, 1\)"),
        (dict(beta2=[-0.1, 0.9]), r"`beta2\[0\]` should lie in \[0, 1\)"),
        (dict(eps=[1e-8, -1.0]), r"`eps\[1\]` should be a finite number >= 0"),
        (dict(step=[float("nan"), 0.0]), r"`step\[0\]` should be a finite number >= 0"),
        (
            dict(losses=lambda d: torch.ones(3, device=d)),
            r"`grads\[0\]` should be a stack of shape \[T, \*shape\] with T = 3",
        ),
    ],
)
def test_rejects_bad_arguments(device: str, changes: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        ops.affinity_adam(*bad_case(device, **changes))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible GPU")
def test_rejects_tensors_on_different_devices() -> None:
    args = bad_case("cuda", exp_avg_sqs=[None, torch.ones(4)])
    with pytest.raises(RuntimeError, match=r"`exp_avg_sqs\[1\]` should be on the device"):
        ops.affinity_adam(*args)
