"""The smallest useful loop: three regression tasks on one shared trunk, with the tracker.

Tasks 0 and 1 are built to agree (their targets are close functions of the input)
and task 2 to need other features (its target depends on an unrelated direction), so
the affinity printed at the end is larger between 0 and 1 than against task 2.

    python examples/minimal_tracker.py
"""

import torch
from torch import nn

import etap_torch

torch.manual_seed(0)
num_tasks, features = 3, 16
weights = torch.randn(features, 1)
task_weights = [weights, weights + 0.1 * torch.randn(features, 1), torch.randn(features, 1)]

trunk = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(num_tasks))
optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
tracker = etap_torch.AffinityTracker(trunk.parameters(), optimizer)

for _ in range(300):
    inputs = torch.randn(64, features)
    shared = trunk(inputs)
    targets = [torch.tanh(inputs @ w) for w in task_weights]
    losses = [nn.functional.mse_loss(h(shared), y) for h, y in zip(heads, targets, strict=True)]
    optimizer.zero_grad()
    tracker.backward(losses)  # in place of sum(losses).backward()
    optimizer.step()  # the tracker scores the step in a pre-hook

print("affinity A[source, target], mean over", int(tracker.counts.min()), "steps:")
print(tracker.affinity)
print("standard error:")
print(tracker.stderr)
tracker.remove()
