"""AffinityTracker with torch.amp.GradScaler: unscaled gradients, overflowed steps skipped."""

from __future__ import annotations

import copy

import _fallback_ops  # noqa: F401
import pytest
import torch
from test_tracker import ThreeHeadModel, assert_bitwise_equal, make_batch

from etap_torch import AffinityTracker


def train(init_scale: float | None, autocast: bool, steps: int, same_batch: bool = False):
    torch.manual_seed(0)
    model = ThreeHeadModel(torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = None if init_scale is None else torch.amp.GradScaler("cpu", init_scale=init_scale)
    tracker = AffinityTracker(model.trunk.parameters(), optimizer, scaler=scaler)
    for step in range(steps):
        batch = make_batch(0 if same_batch else step, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            losses = model.task_losses(*batch)
        tracker.backward(losses)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()
    return tracker


@pytest.mark.parametrize("init_scale", [2.0**4, 2.0**12])
def test_two_scales_agree_with_fp32(init_scale):
    reference = train(None, autocast=False, steps=4)
    tracker = train(init_scale, autocast=True, steps=4)
    assert tracker.skipped_steps == 0
    assert tracker.counts.eq(4).all()
    torch.testing.assert_close(tracker.affinity, reference.affinity, rtol=0, atol=1e-3)


def test_scaled_fp32_equals_fp32_to_rounding():
    reference = train(None, autocast=False, steps=3)
    tracker = train(2.0**20, autocast=False, steps=3)
    torch.testing.assert_close(tracker.affinity, reference.affinity, rtol=1e-6, atol=1e-6)


def test_overflowed_steps_are_skipped_and_counted():
    tracker = train(2.0**40, autocast=True, steps=40, same_batch=True)
    assert tracker.skipped_steps > 0
    taken = 40 - tracker.skipped_steps
    # The last step is pending when training stops; it was taken if the count says so.
    assert tracker.counts.eq(taken).all() or tracker.counts.eq(taken - 1).all()
    assert tracker.missing.eq(tracker.skipped_steps).all()
    reference = train(None, autocast=True, steps=int(tracker.counts[0, 0]), same_batch=True)
    torch.testing.assert_close(tracker.affinity, reference.affinity, rtol=0, atol=1e-3)


def test_grads_equal_the_scaled_summed_backward():
    torch.manual_seed(1)
    model = ThreeHeadModel(torch.float32)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tracker = AffinityTracker(model.trunk.parameters(), optimizer, scaler=scaler)
    batch = make_batch(0, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        losses = model.task_losses(*batch)
        twin_losses = twin.task_losses(*batch)
    tracker.backward(losses)
    twin_scaler.scale(sum(twin_losses)).backward()
    assert_bitwise_equal([p.grad for p in model.parameters()], [p.grad for p in twin.parameters()])
