"""The exact lookahead against closed forms, and the first-order tracker against it."""

from __future__ import annotations

import copy

import _fallback_ops  # noqa: F401
import pytest
import torch
from test_tracker import ThreeHeadModel, make_batch, state_snapshot
from torch import nn

from etap_torch import AffinityTracker
from etap_torch.lookahead import exact_lookahead


@pytest.mark.parametrize("lr", [0.1, 0.01])
def test_opposite_quadratics_closed_form(lr):
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=lr)
    score = exact_lookahead(lambda: [(w - 1) ** 2, (w + 1) ** 2], [w], optimizer)
    # A step on task 0 moves w to 2 * lr: L0 = (1 - 2 lr)^2, L1 = (1 + 2 lr)^2.
    expected = torch.tensor(
        [[4 - 4 * lr, -4 - 4 * lr], [-4 - 4 * lr, 4 - 4 * lr]], dtype=torch.float64
    )
    torch.testing.assert_close(score, expected, rtol=1e-12, atol=1e-12)
    assert w.item() == 0.0 and w.grad is None


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True),
    ],
    ids=["sgd", "adamw"],
)
def test_first_order_converges_to_exact_as_lr_shrinks(make_optimizer):
    torch.manual_seed(0)
    model = ThreeHeadModel()
    optimizer = make_optimizer(model.parameters())
    for step in range(2):  # give the optimizer a state
        sum(model.task_losses(*make_batch(step))).backward()
        optimizer.step()
        optimizer.zero_grad()

    batch = make_batch(9)
    errors = []
    for lr in (1e-2, 1e-3, 1e-4):
        exact = exact_lookahead(
            lambda: model.task_losses(*batch), model.trunk.parameters(), optimizer, lr=lr
        )
        shadow = copy.deepcopy((model, optimizer))
        tracker = AffinityTracker(shadow[0].trunk.parameters(), shadow[1])
        tracker.backward(shadow[0].task_losses(*batch))
        shadow[1].step()
        errors.append((tracker.affinity - exact).abs().max().item())
    assert errors[0] > 5 * errors[1] > 25 * errors[2]
    assert errors[2] < 1e-3 * tracker.affinity.abs().max().item()


class NormalisedDropoutModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
        self.double()

    def losses(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(inputs)
        return [(head(features) - 1).square().mean() for head in self.heads]


def test_lookahead_disturbs_nothing_and_sees_the_same_dropout_masks():
    torch.manual_seed(1)
    model = NormalisedDropoutModel().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs = torch.randn(8, 4, dtype=torch.float64)
    sum(model.losses(inputs)).backward()
    optimizer.step()
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.5)

    before_params = [p.detach().clone() for p in model.parameters()]
    before_buffers = [b.clone() for b in model.buffers()]
    before_state = state_snapshot(optimizer)
    torch.manual_seed(5)
    before_rng = torch.get_rng_state()
    exact = exact_lookahead(
        lambda: model.losses(inputs), model.trunk.parameters(), optimizer, model=model, lr=1e-6
    )

    assert all(
        torch.equal(a, b.detach()) for a, b in zip(before_params, model.parameters(), strict=True)
    )
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before_buffers, model.buffers(), strict=True))
    assert torch.equal(before_rng, torch.get_rng_state())
    after_state = state_snapshot(optimizer)
    assert all(
        a[:2] == b[:2] and torch.equal(a[2], b[2])
        for a, b in zip(before_state, after_state, strict=True)
    )

    # A different dropout mask in a trial forward would change the losses by O(1), far
    # more than the O(lr) gap to the first-order score at the same masks.
    for param in model.parameters():
        param.grad = None
    tracker = AffinityTracker(model.trunk.parameters(), optimizer)
    torch.manual_seed(5)
    tracker.backward(model.losses(inputs))
    optimizer.step()
    torch.testing.assert_close(exact, tracker.affinity, rtol=1e-4, atol=1e-4)


def test_lookahead_errors_name_the_argument():
    w = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.SGD([{"params": [w], "lr": 0.0}])
    with pytest.raises(ValueError, match="Parameter `lr` should be given"):
        exact_lookahead(lambda: [w**2], [w], optimizer)
    with pytest.raises(ValueError, match="Parameter `shared_params` should"):
        exact_lookahead(lambda: [w**2], [], optimizer)
    with pytest.raises(ValueError, match="Parameter `lr` should be a positive"):
        exact_lookahead(lambda: [w**2], [w], optimizer, lr=-1.0)
