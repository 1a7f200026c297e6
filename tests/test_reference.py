"""The float64 reference directions against the shadow optimizer step.

The reference and the tracker's optimizer translation are checked here without any fused
kernel, so a failure points at the translation, not at an operator.
"""

from __future__ import annotations

import pytest
import torch
from reference import adam_directions, sgd_directions
from test_tracker import (
    NUM_TASKS,
    OPTIMIZER_CONFIGS,
    ThreeHeadModel,
    make_batch,
    shadow_directions,
)

from etap_torch.tracker import adam_arguments, sgd_scales_and_offsets


def groups_of(optimizer, params):
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return [group_of[id(p)] for p in params]


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CONFIGS))
def test_translated_directions_equal_the_shadow_step(name):
    torch.manual_seed(0)
    model = ThreeHeadModel()
    optimizer = OPTIMIZER_CONFIGS[name](model)
    shared = list(model.trunk.parameters())
    for step in range(3):
        losses = model.task_losses(*make_batch(step))
        per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
        grads = [torch.stack(column) for column in zip(*per_task, strict=True)]

        groups = groups_of(optimizer, shared)
        if name.startswith("sgd"):
            scales, offsets = sgd_scales_and_offsets(optimizer, shared, groups)
            directions = sgd_directions(grads, scales, offsets)
        else:
            arguments = adam_arguments(optimizer, shared, groups)
            directions = adam_directions(grads, shared, *arguments)

        for source in range(NUM_TASKS):
            expected = shadow_directions(optimizer, shared, list(per_task[source]))
            for direction, oracle in zip(directions, expected, strict=True):
                torch.testing.assert_close(direction[source], oracle, rtol=1e-9, atol=1e-9)

        sum(losses).backward()
        optimizer.step()
        optimizer.zero_grad()
