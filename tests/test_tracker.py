"""AffinityTracker against a shadow optimizer step in float64 and against hand-worked values."""

from __future__ import annotations

import copy
import gc
import math
import warnings

import pytest
import torch
from torch import nn

from etap_torch import AffinityTracker

NUM_TASKS = 3


class ThreeHeadModel(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(NUM_TASKS))
        self.to(dtype)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        return self.task_losses(inputs, targets)

    def task_losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(inputs)
        return [
            ((head(features).squeeze(-1) - targets[:, t]) ** 2).mean() + 0.1
            for t, head in enumerate(self.heads)
        ]


def make_batch(seed: int, size: int = 16, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, 5, generator=generator, dtype=dtype)
    targets = torch.randn(size, NUM_TASKS, generator=generator, dtype=dtype)
    return inputs, targets


def shadow_directions(
    optimizer: torch.optim.Optimizer, shared: list[torch.Tensor], source_grads: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The oracle: a deep copy of the optimizer steps on one task's gradient alone."""
    positions = {id(p): i for i, p in enumerate(shared)}
    shadow = copy.deepcopy(optimizer)
    moved: list[torch.Tensor | None] = [None] * len(shared)
    before: list[torch.Tensor | None] = [None] * len(shared)
    learning_rates: list[float] = [0.0] * len(shared)
    for original_group, shadow_group in zip(
        optimizer.param_groups, shadow.param_groups, strict=True
    ):
        for original, copied in zip(original_group["params"], shadow_group["params"], strict=True):
            if id(original) in positions:
                k = positions[id(original)]
                copied.grad = source_grads[k].clone()
                moved[k] = copied
                before[k] = copied.detach().clone()
                learning_rates[k] = float(shadow_group["lr"])
            else:
                copied.grad = None
    shadow.step()
    return [
        (start - param.detach()) / lr
        for start, param, lr in zip(before, moved, learning_rates, strict=True)
    ]


def oracle_affinity(
    model: ThreeHeadModel,
    optimizer: torch.optim.Optimizer,
    batch,
    normalize: str = "loss",
) -> torch.Tensor:
    shared = list(model.trunk.parameters())
    losses = model.task_losses(*batch)
    grads = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    result = torch.zeros(NUM_TASKS, NUM_TASKS, dtype=torch.float64)
    for source in range(NUM_TASKS):
        directions = shadow_directions(optimizer, shared, list(grads[source]))
        for target in range(NUM_TASKS):
            inner = sum(
                (g * d).sum() for g, d in zip(grads[target], directions, strict=True)
            ).item()
            result[source, target] = inner / (losses[target].item() if normalize == "loss" else 1)
    return result


def grouped(model: ThreeHeadModel, first: dict, second: dict, heads: dict) -> list[dict]:
    return [
        {"params": list(model.trunk[0].parameters()), **first},
        {"params": list(model.trunk[2].parameters()), **second},
        {"params": list(model.heads.parameters()), **heads},
    ]


OPTIMIZER_CONFIGS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "sgd_dampening": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.8, dampening=0.3),
    "sgd_nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
    "sgd_weight_decay": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.05),
    "sgd_maximize": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, maximize=True),
    "sgd_everything": lambda m: torch.optim.SGD(
        m.parameters(),
        lr=0.05,
        momentum=0.7,
        weight_decay=0.02,
        nesterov=True,
        maximize=True,
    ),
    "sgd_groups": lambda m: torch.optim.SGD(
        grouped(
            m,
            {"lr": 0.1, "momentum": 0.9, "dampening": 0.2},
            {"lr": 0.03, "momentum": 0.5, "nesterov": True, "weight_decay": 0.1},
            {"lr": 0.2},
        ),
        lr=0.1,
    ),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    "adam_weight_decay": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.1),
    "adam_amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True),
    "adam_maximize": lambda m: torch.optim.Adam(m.parameters(), lr=0.001, maximize=True),
    "adam_decoupled": lambda m: torch.optim.Adam(
        m.parameters(), lr=0.01, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
    "adamw_amsgrad_maximize": lambda m: torch.optim.AdamW(
        m.parameters(), lr=0.001, weight_decay=0.05, amsgrad=True, maximize=True
    ),
    "adam_groups": lambda m: torch.optim.Adam(
        grouped(
            m,
            {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "amsgrad": True},
            {"lr": 0.003, "betas": (0.95, 0.9), "weight_decay": 0.2},
            {"lr": 0.01},
        )
    ),
    "adamw_fused_groups": lambda m: torch.optim.AdamW(
        grouped(
            m,
            {"lr": 0.01, "weight_decay": 0.3},
            {"lr": 0.02, "betas": (0.5, 0.6), "amsgrad": True},
            {"lr": 0.01},
        ),
        fused=True,
    ),
}


def state_snapshot(optimizer: torch.optim.Optimizer) -> list:
    state = optimizer.state_dict()["state"]
    return [(key, name, value.clone()) for key in state for name, value in state[key].items()]


def assert_bitwise_equal(left, right) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            assert a is not None and b is not None
            assert a.dtype == b.dtype and torch.equal(a, b)
        elif isinstance(a, tuple):
            assert_bitwise_equal(a, b)
        else:
            assert a == b


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CONFIGS))
def test_every_optimizer_matches_the_shadow_step(name):
    torch.manual_seed(0)
    model = ThreeHeadModel()
    twin = copy.deepcopy(model)
    optimizer = OPTIMIZER_CONFIGS[name](model)
    twin_optimizer = OPTIMIZER_CONFIGS[name](twin)
    tracker = AffinityTracker(model.trunk.parameters(), optimizer)

    expected = []
    for step in range(4):
        batch = make_batch(step)
        expected.append(oracle_affinity(model, optimizer, batch))

        tracker.backward(model.task_losses(*batch))
        sum(twin.task_losses(*batch)).backward()
        assert_bitwise_equal(
            [p.grad for p in model.parameters()], [p.grad for p in twin.parameters()]
        )
        optimizer.step()
        twin_optimizer.step()
        optimizer.zero_grad()
        twin_optimizer.zero_grad()

        assert_bitwise_equal(list(model.parameters()), list(twin.parameters()))
        assert_bitwise_equal(state_snapshot(optimizer), state_snapshot(twin_optimizer))
        mean = torch.stack(expected).mean(0)
        torch.testing.assert_close(tracker.affinity, mean, rtol=1e-9, atol=1e-9)
    assert tracker.counts.eq(4).all()


def test_pinned_opposite_quadratics_plain_sgd():
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1)
    tracker = AffinityTracker([w], optimizer)
    tracker.backward([(w - 1) ** 2, (w + 1) ** 2])
    assert w.grad.item() == 0.0
    optimizer.step()
    expected = torch.tensor([[4.0, -4.0], [-4.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(tracker.affinity, expected)


def test_pinned_task_that_skips_a_shared_scalar():
    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([a, b], lr=0.1)
    tracker = AffinityTracker([a, b], optimizer)
    tracker.backward([(a + b - 1) ** 2, (a - 1) ** 2])
    optimizer.step()
    expected = torch.tensor([[8.0, 4.0], [4.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(tracker.affinity, expected)


@pytest.mark.parametrize("batched", [True, False])
def test_pinned_momentum_buffer(batched):
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    optimizer.state[w]["momentum_buffer"] = torch.tensor(2.0, dtype=torch.float64)
    tracker = AffinityTracker([w], optimizer, batched=batched)
    tracker.backward([w + 1, 1 - w])
    optimizer.step()
    expected = torch.tensor([[2.8, -2.8], [0.8, -0.8]], dtype=torch.float64)
    torch.testing.assert_close(tracker.affinity, expected)


def test_pinned_fresh_adam():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=0.1)
    tracker = AffinityTracker([w], optimizer)
    g1 = torch.tensor([0.001, -2.0], dtype=torch.float64)
    g2 = torch.tensor([3.0, 2.0], dtype=torch.float64)
    tracker.backward([(g1 * w).sum() + 1, (g2 * w).sum() + 1])
    optimizer.step()
    exact = 3 * 0.001 / (0.001 + 1e-8) - 2 * 2 / (2 + 1e-8)
    assert tracker.affinity[0, 1].item() == pytest.approx(exact, rel=1e-12)
    assert tracker.affinity[0, 1].item() == pytest.approx(3 * 0.001 / (0.001 + 1e-8) - 2, abs=1e-7)


def live_tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():
        # Scanning every object touches deprecated module attributes that warn.
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_fifty_steps_leave_grads_and_memory_as_without_tracker():
    torch.manual_seed(1)
    model = ThreeHeadModel(torch.float32)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    tracker = AffinityTracker(model.trunk.parameters(), optimizer)

    counts_of_live_tensors = []
    for step in range(50):
        batch = make_batch(step, dtype=torch.float32)
        losses = model.task_losses(*batch)
        tracker.backward(losses)
        sum(twin.task_losses(*batch)).backward()
        assert_bitwise_equal(
            [p.grad for p in model.parameters()], [p.grad for p in twin.parameters()]
        )
        optimizer.step()
        twin_optimizer.step()
        optimizer.zero_grad()
        twin_optimizer.zero_grad()
        if step == 0:
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                losses[0].backward()
        del losses
        if step in (10, 49):
            counts_of_live_tensors.append(live_tensor_count())
    assert counts_of_live_tensors[0] == counts_of_live_tensors[1]
    assert tracker.counts.eq(50).all()


def test_grads_add_to_what_is_there():
    torch.manual_seed(2)
    model = ThreeHeadModel()
    twin = copy.deepcopy(model)
    for param, twin_param in zip(model.parameters(), twin.parameters(), strict=True):
        param.grad = torch.full_like(param, 0.25)
        twin_param.grad = torch.full_like(twin_param, 0.25)
    tracker = AffinityTracker(model.trunk.parameters(), torch.optim.SGD(model.parameters(), lr=1))
    batch = make_batch(3)
    tracker.backward(model.task_losses(*batch))
    sum(twin.task_losses(*batch)).backward()
    assert_bitwise_equal([p.grad for p in model.parameters()], [p.grad for p in twin.parameters()])


def run_measured(model, optimizer, tracker, steps, first_seed=0):
    for step in range(steps):
        tracker.backward(model.task_losses(*make_batch(first_seed + step)))
        optimizer.step()
        optimizer.zero_grad()


def test_every_k_measures_every_kth_step():
    torch.manual_seed(3)
    model = ThreeHeadModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    tracker = AffinityTracker(model.trunk.parameters(), optimizer, every=3)
    expected = []
    for step in range(7):
        batch = make_batch(step)
        if step % 3 == 0:
            expected.append(oracle_affinity(model, optimizer, batch))
        tracker.backward(model.task_losses(*batch))
        optimizer.step()
        optimizer.zero_grad()
    assert tracker.measured_steps == 3
    assert tracker.counts.eq(3).all()
    stacked = torch.stack(expected)
    torch.testing.assert_close(tracker.affinity, stacked.mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        tracker.stderr, stacked.std(0, unbiased=True) / math.sqrt(3), rtol=1e-7, atol=1e-9
    )


def test_normalize_none_skips_the_division():
    torch.manual_seed(4)
    model = ThreeHeadModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = AffinityTracker(model.trunk.parameters(), optimizer, normalize="none")
    batch = make_batch(0)
    expected = oracle_affinity(model, optimizer, batch, normalize="none")
    tracker.backward(model.task_losses(*batch))
    optimizer.step()
    torch.testing.assert_close(tracker.affinity, expected, rtol=1e-9, atol=1e-9)


def test_bad_target_loss_is_missing_not_zero():
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1)
    tracker = AffinityTracker([w], optimizer)
    tracker.backward([(w - 1) ** 2, (w + 1) ** 2 - 5])
    optimizer.step()
    tracker.backward([(w - 1) ** 2, (w + 1) ** 2])
    optimizer.step()
    assert tracker.counts.tolist() == [[2, 1], [2, 1]]
    assert not torch.isnan(tracker.affinity).any()

    with pytest.warns(RuntimeWarning, match="Parameter `losses` should be finite"):
        tracker.backward([(w - 1) ** 2, (w + 1) ** 2 * math.inf])
    optimizer.step()
    assert tracker.counts[:, 0].tolist() == [3, 2]
    assert tracker.counts[:, 1].tolist() == [1, 1]
    assert tracker.missing.tolist() == [[0, 2], [1, 2]]


def test_never_valid_entries_are_nan():
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1)
    tracker = AffinityTracker([w], optimizer)
    tracker.backward([(w - 1) ** 2, w * 0.0])
    optimizer.step()
    assert tracker.counts.tolist() == [[1, 0], [1, 0]]
    assert torch.isnan(tracker.affinity[:, 1]).all()
    assert tracker.affinity[0, 0].item() == pytest.approx(4.0)


def test_state_dict_resumes_exactly():
    def fresh():
        torch.manual_seed(5)
        model = ThreeHeadModel()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, optimizer

    model, optimizer = fresh()
    straight = AffinityTracker(model.trunk.parameters(), optimizer, every=2)
    run_measured(model, optimizer, straight, 7)

    model, optimizer = fresh()
    first = AffinityTracker(model.trunk.parameters(), optimizer, every=2)
    run_measured(model, optimizer, first, 3)
    saved = copy.deepcopy(first.state_dict())
    first.remove()
    second = AffinityTracker(model.trunk.parameters(), optimizer)
    second.load_state_dict(saved)
    run_measured(model, optimizer, second, 4, first_seed=3)

    assert second.every == 2 and second.measured_steps == straight.measured_steps == 4
    assert torch.equal(second.counts, straight.counts)
    assert torch.equal(second.affinity, straight.affinity)
    assert torch.equal(second.stderr.nan_to_num(-1), straight.stderr.nan_to_num(-1))

    with pytest.raises(ValueError, match="Parameter `state_dict` should"):
        second.load_state_dict({"mean": 1})


def test_reset_remove_and_context_manager():
    torch.manual_seed(6)
    model = ThreeHeadModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with AffinityTracker(model.trunk.parameters(), optimizer) as tracker:
        run_measured(model, optimizer, tracker, 2)
        assert tracker.counts.eq(2).all()
        tracker.reset()
        assert tracker.counts.numel() == 0 and tracker.measured_steps == 0
        run_measured(model, optimizer, tracker, 1)
        assert tracker.counts.eq(1).all()
    assert len(optimizer._optimizer_step_pre_hooks) == 0
    run_measured(model, optimizer, tracker, 1)
    assert tracker.counts.eq(1).all()


def test_custom_direction_function_matches_the_shadow_step():
    torch.manual_seed(7)
    model = ThreeHeadModel()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.5)
    shared = list(model.trunk.parameters())

    def rmsprop_directions(per_task_grads):
        per_source = [
            shadow_directions(optimizer, shared, [grad[source] for grad in per_task_grads])
            for source in range(NUM_TASKS)
        ]
        return [torch.stack(column) for column in zip(*per_source, strict=True)]

    tracker = AffinityTracker(shared, optimizer, direction_fn=rmsprop_directions)
    expected = []
    for step in range(3):
        batch = make_batch(step)
        expected.append(oracle_affinity(model, optimizer, batch))
        tracker.backward(model.task_losses(*batch))
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(
        tracker.affinity, torch.stack(expected).mean(0), rtol=1e-9, atol=1e-9
    )


def test_dict_losses_give_task_names():
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1)
    tracker = AffinityTracker([w], optimizer)
    tracker.backward({"left": (w - 1) ** 2, "right": (w + 1) ** 2})
    optimizer.step()
    assert tracker.task_names == ["left", "right"]
    with pytest.raises(ValueError, match="Parameter `losses` should have the keys"):
        tracker.backward({"right": (w + 1) ** 2, "left": (w - 1) ** 2})


def test_errors_name_the_argument():
    model = ThreeHeadModel()
    optimizer = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    shared = list(model.trunk.parameters())

    with pytest.raises(ValueError, match="Parameter `shared_params` should contain at least one"):
        AffinityTracker([], optimizer)
    with pytest.raises(ValueError, match="Parameter `shared_params` should contain only param"):
        AffinityTracker(shared, optimizer)
    full = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Parameter `shared_params` should name every param"):
        AffinityTracker([shared[0], shared[1], shared[0]], full)
    with pytest.raises(
        TypeError, match=r"Parameter `optimizer` should .*torch\.optim\.rmsprop\.RMSprop"
    ):
        AffinityTracker(shared, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="Parameter `every` should"):
        AffinityTracker(shared, full, every=0)
    with pytest.raises(ValueError, match="Parameter `normalize` should"):
        AffinityTracker(shared, full, normalize="target")

    tracker = AffinityTracker(shared, full)
    losses = model.task_losses(*make_batch(0))
    with pytest.raises(ValueError, match="Parameter `losses` should contain scalar tensors"):
        tracker.backward([losses[0], torch.stack(losses)])
    tracker.backward(losses)
    with pytest.raises(ValueError, match="Parameter `losses` should contain 3 losses"):
        tracker.backward(model.task_losses(*make_batch(1))[:2])
    with pytest.raises(TypeError, match="Parameter `losses` should be a sequence or dict"):
        tracker.backward(torch.stack(model.task_losses(*make_batch(1))))


def test_accumulation_over_four_micro_batches_equals_one_batch():
    torch.manual_seed(8)
    model = ThreeHeadModel()
    reference_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    reference_optimizer = torch.optim.SGD(
        reference_model.parameters(), lr=0.1, momentum=0.9, nesterov=True
    )
    tracker = AffinityTracker(model.trunk.parameters(), optimizer)
    reference = AffinityTracker(reference_model.trunk.parameters(), reference_optimizer)

    for step in range(3):
        inputs, targets = make_batch(step, size=16)
        for micro in range(4):
            rows = slice(4 * micro, 4 * micro + 4)
            losses = model.task_losses(inputs[rows], targets[rows])
            tracker.backward([loss / 4 for loss in losses])
        reference.backward(reference_model.task_losses(inputs, targets))
        for param, reference_param in zip(
            model.parameters(), reference_model.parameters(), strict=True
        ):
            torch.testing.assert_close(param.grad, reference_param.grad, rtol=1e-12, atol=1e-12)
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
    assert tracker.counts.eq(3).all()
    torch.testing.assert_close(tracker.affinity, reference.affinity, rtol=1e-10, atol=1e-10)


def test_docstring_example_runs():
    import doctest

    import etap_torch.tracker

    result = doctest.testmod(etap_torch.tracker, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", ["sgd_everything", "sgd_groups", "adam_groups", "adamw"])
def test_float32_training_matches_the_float64_oracle(name):
    torch.manual_seed(9)
    model = ThreeHeadModel(torch.float32)
    optimizer = OPTIMIZER_CONFIGS[name](model)
    tracker = AffinityTracker(model.trunk.parameters(), optimizer)
    expected = []
    for step in range(3):
        batch = make_batch(step, dtype=torch.float32)
        shadow_model, shadow_optimizer = copy.deepcopy((model, optimizer))
        shadow_model.double()
        for state in shadow_optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.double()
        expected.append(
            oracle_affinity(shadow_model, shadow_optimizer, tuple(t.double() for t in batch))
        )
        tracker.backward(model.task_losses(*batch))
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(
        tracker.affinity, torch.stack(expected).mean(0), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    ("key", "corrupt", "message"),
    [
        ("count", lambda t: torch.full_like(t, -5), "non-negative integer counts"),
        ("count", lambda t: t.double(), "non-negative integer counts"),
        ("mean", lambda t: t * math.nan, "finite `mean`"),
        ("m2", lambda t: t * math.inf, "finite `m2`"),
    ],
)
def test_load_state_dict_refuses_corrupted_statistics(key, corrupt, message):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    tracker = AffinityTracker([param], optimizer)
    tracker.backward([(param - 1).pow(2).sum(), (param + 1).pow(2).sum()])
    optimizer.step()
    state = tracker.state_dict()
    state[key] = corrupt(state[key])
    with pytest.raises(ValueError, match=message):
        AffinityTracker([param], optimizer).load_state_dict(state)
