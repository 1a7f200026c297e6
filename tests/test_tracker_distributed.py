"""AffinityTracker on two processes (gloo): the score of the global per-task gradients."""

from __future__ import annotations

import os

import _fallback_ops  # noqa: F401
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_tracker import ThreeHeadModel, make_batch
from torch.nn.parallel import DistributedDataParallel

from etap_torch import AffinityTracker

WORLD_SIZE = 2
STEPS = 3
BATCH = 16


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)


def replicated_run(rank: int) -> dict:
    torch.manual_seed(0)
    model = ThreeHeadModel()
    wrapped = DistributedDataParallel(model)
    optimizer = make_optimizer(model)
    # One backward per task: the batched backward's one-time start-up would dominate here.
    tracker = AffinityTracker(model.trunk.parameters(), optimizer, batched=False)
    rows = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    first_grads = None
    for step in range(STEPS):
        inputs, targets = make_batch(step, size=BATCH)
        tracker.backward(wrapped(inputs[rows], targets[rows]))
        if first_grads is None:
            first_grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()
    return {"affinity": tracker.affinity, "first_grads": first_grads}


def sharded_run(rank: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = ThreeHeadModel()
    optimizer = make_optimizer(model)
    own_part = list(model.trunk.parameters())[rank::WORLD_SIZE]
    tracker = AffinityTracker(own_part, optimizer, distributed="sharded", batched=False)
    for step in range(STEPS):
        tracker.backward(model.task_losses(*make_batch(step, size=BATCH)))
        optimizer.step()
        optimizer.zero_grad()
    return tracker.affinity


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    torch.set_num_threads(1)
    try:
        result = replicated_run(rank)
        result["sharded"] = sharded_run(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_the_global_gradient(tmp_path):
    mp.spawn(
        worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    torch.manual_seed(0)
    model = ThreeHeadModel()
    optimizer = make_optimizer(model)
    reference = AffinityTracker(model.trunk.parameters(), optimizer)
    reference_grads = None
    for step in range(STEPS):
        reference.backward(model.task_losses(*make_batch(step, size=BATCH)))
        if reference_grads is None:
            reference_grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()

    assert torch.equal(ranks[0]["affinity"], ranks[1]["affinity"])
    torch.testing.assert_close(ranks[0]["affinity"], reference.affinity, rtol=1e-10, atol=1e-10)
    for rank in ranks:
        for grad, reference_grad in zip(rank["first_grads"], reference_grads, strict=True):
            torch.testing.assert_close(grad, reference_grad, rtol=1e-12, atol=1e-12)

    assert torch.equal(ranks[0]["sharded"], ranks[1]["sharded"])
    torch.testing.assert_close(ranks[0]["sharded"], reference.affinity, rtol=1e-10, atol=1e-10)
