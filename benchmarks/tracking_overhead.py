"""Per-step cost of measuring task affinity during training.

For three multi-task workloads it times, side by side in alternating rounds:

    plain       sum(losses).backward(); optimizer.step()
    every=1     AffinityTracker measuring every step (first-order, fused operator)
    every=10    AffinityTracker measuring every tenth step
    exact       TAG's exact lookahead every step (a trial step and a forward per task)

It first checks that the tracker's score of one step matches the exact lookahead at a
tiny learning rate, then prints the time per step, the time each method adds to plain
training and the ratios the design aims at (every=1 adds at most half of what the exact
lookahead adds; every=10 adds at most 15 % to plain training), and the Pearson
correlation between first-order and exact scores over a run at the real learning rate.

Workloads: (a) the chemical MLP of the ETAP paper (10 tasks, trunk 180-32-16, real data
vendored in etap_torch/data/chemical), (b) a small convolutional trunk on 64x64 inputs
with 9 binary heads, (c) a small transformer trunk with 8 regression heads; (b) and (c)
on synthetic data.

    python benchmarks/tracking_overhead.py [--device cpu|cuda] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from etap_torch import AffinityTracker
from etap_torch.lookahead import exact_lookahead

CHEMICAL_DIR = os.path.join(os.path.dirname(__file__), "..", "etap_torch", "data", "chemical")
CHEMICAL_TASKS = ["83", "78", "84", "85", "76", "86", "81", "80", "87", "55"]


class MultiTaskModel(nn.Module):
    def __init__(self, trunk: nn.Module, width: int, num_tasks: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))


class Workload:
    """A model, an optimizer factory and a stream of batches with a per-task loss."""

    def __init__(
        self,
        name: str,
        model: MultiTaskModel,
        make_batch: Callable[[int], tuple],
        task_losses: Callable[[MultiTaskModel, tuple], list[torch.Tensor]],
        lr: float,
    ) -> None:
        self.name = name
        self.model = model
        self.make_batch = make_batch
        self.task_losses = task_losses
        self.lr = lr

    def fresh(self) -> tuple[MultiTaskModel, torch.optim.Optimizer]:
        model = copy.deepcopy(self.model)
        return model, torch.optim.Adam(model.parameters(), lr=self.lr)


def chemical_workload(device: torch.device, per_task: int = 32) -> Workload:
    generator = torch.Generator().manual_seed(0)
    features, labels = [], []
    for task in CHEMICAL_TASKS:
        features.append(torch.from_numpy(np.load(f"{CHEMICAL_DIR}/{task}_X_train.npy")).float())
        labels.append(torch.from_numpy(np.load(f"{CHEMICAL_DIR}/{task}_y_train.npy")).float())
    trunk = nn.Sequential(nn.Linear(180, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
    model = MultiTaskModel(trunk, 16, len(CHEMICAL_TASKS)).to(device)

    def make_batch(step: int) -> tuple:
        inputs, targets = [], []
        for x, y in zip(features, labels, strict=True):
            rows = torch.randint(0, x.shape[0], (per_task,), generator=generator)
            inputs.append(x[rows])
            targets.append(y[rows])
        return torch.cat(inputs).to(device), torch.stack(targets).to(device)

    def task_losses(model: MultiTaskModel, batch: tuple) -> list[torch.Tensor]:
        inputs, targets = batch
        shared = model.trunk(inputs).split(per_task)
        return [
            nn.functional.binary_cross_entropy_with_logits(head(rows).squeeze(-1), target)
            for head, rows, target in zip(model.heads, shared, targets, strict=True)
        ]

    return Workload("chemical MLP (10 tasks)", model, make_batch, task_losses, lr=1e-3)


def conv_workload(device: torch.device, batch_size: int = 32) -> Workload:
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    model = MultiTaskModel(trunk, 64, 9).to(device)
    generator = torch.Generator().manual_seed(1)

    def make_batch(step: int) -> tuple:
        images = torch.randn(batch_size, 3, 64, 64, generator=generator)
        labels = (torch.rand(batch_size, 9, generator=generator) < 0.5).float()
        return images.to(device), labels.to(device)

    def task_losses(model: MultiTaskModel, batch: tuple) -> list[torch.Tensor]:
        images, labels = batch
        features = model.trunk(images)
        return [
            nn.functional.binary_cross_entropy_with_logits(head(features).squeeze(-1), labels[:, t])
            for t, head in enumerate(model.heads)
        ]

    return Workload("conv trunk 64x64 (9 tasks)", model, make_batch, task_losses, lr=1e-3)


class TransformerTrunk(nn.Module):
    def __init__(self, features: int = 8, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(series)).mean(dim=1)


def transformer_workload(device: torch.device, batch_size: int = 32) -> Workload:
    model = MultiTaskModel(TransformerTrunk(), 64, 8).to(device)
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(8, 8, generator=generator)

    def make_batch(step: int) -> tuple:
        series = torch.randn(batch_size, 16, 8, generator=generator)
        targets = series.mean(dim=1) @ mixing + 0.1 * torch.randn(
            batch_size, 8, generator=generator
        )
        return series.to(device), targets.to(device)

    def task_losses(model: MultiTaskModel, batch: tuple) -> list[torch.Tensor]:
        series, targets = batch
        features = model.trunk(series)
        return [
            nn.functional.mse_loss(head(features).squeeze(-1), targets[:, t])
            for t, head in enumerate(model.heads)
        ]

    return Workload("transformer trunk (8 tasks)", model, make_batch, task_losses, lr=1e-3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One training loop of one method; `run(steps)` returns the seconds per step."""

    def __init__(self, workload: Workload, method: str, device: torch.device) -> None:
        self.workload = workload
        self.method = method
        self.device = device
        self.model, self.optimizer = workload.fresh()
        self.tracker = None
        if method.startswith("every="):
            every = int(method.split("=")[1])
            self.tracker = AffinityTracker(
                self.model.trunk.parameters(), self.optimizer, every=every
            )
        self.step_index = 0

    def step(self) -> None:
        batch = self.workload.make_batch(self.step_index)
        self.step_index += 1
        if self.method == "exact":
            exact_lookahead(
                lambda: self.workload.task_losses(self.model, batch),
                self.model.trunk.parameters(),
                self.optimizer,
                model=self.model,
            )
        losses = self.workload.task_losses(self.model, batch)
        if self.tracker is None:
            sum(losses).backward()
        else:
            self.tracker.backward(losses)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def run(self, steps: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - start) / steps


def check_against_exact(workload: Workload) -> float:
    """Largest relative gap between one tracked step and the exact lookahead at lr 1e-6."""
    model, optimizer = workload.fresh()
    model = model.double()
    optimizer = torch.optim.Adam(model.parameters(), lr=workload.lr)
    for step in range(3):
        sum(workload.task_losses(model, _to_double(workload.make_batch(step)))).backward()
        optimizer.step()
        optimizer.zero_grad()
    batch = _to_double(workload.make_batch(3))
    exact = exact_lookahead(
        lambda: workload.task_losses(model, batch),
        model.trunk.parameters(),
        optimizer,
        model=model,
        lr=1e-6,
    )
    tracker = AffinityTracker(model.trunk.parameters(), optimizer)
    tracker.backward(workload.task_losses(model, batch))
    optimizer.step()
    return ((tracker.affinity - exact).abs().max() / exact.abs().max()).item()


def _to_double(batch: tuple) -> tuple:
    return tuple(t.double() for t in batch)


def correlation_over_run(workload: Workload, steps: int) -> tuple[float, float]:
    """Pearson correlation of first-order and exact scores at the real learning rate:
    over every entry of every step, and between the two run means."""
    model, optimizer = workload.fresh()
    tracker = AffinityTracker(model.trunk.parameters(), optimizer)
    first_order, exact = [], []
    for step in range(steps):
        batch = workload.make_batch(step)
        exact.append(
            exact_lookahead(
                lambda batch=batch: workload.task_losses(model, batch),
                model.trunk.parameters(),
                optimizer,
                model=model,
            )
        )
        tracker.reset()
        tracker.backward(workload.task_losses(model, batch))
        optimizer.step()
        optimizer.zero_grad()
        first_order.append(tracker.affinity)
    per_step = torch.corrcoef(
        torch.stack([torch.stack(first_order), torch.stack(exact)]).flatten(1)
    )
    means = torch.corrcoef(
        torch.stack([torch.stack(first_order).mean(0), torch.stack(exact).mean(0)]).flatten(1)
    )
    return per_step[0, 1].item(), means[0, 1].item()


METHODS = ["plain", "every=1", "every=10", "exact"]


def benchmark(workload: Workload, device: torch.device, rounds: int, steps: int) -> dict:
    runners = {method: Runner(workload, method, device) for method in METHODS}
    for runner in runners.values():
        runner.run(2)
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for _ in range(rounds):
        for method in METHODS:
            times[method].append(runners[method].run(steps))
    return {method: statistics.median(values) for method, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--correlation-steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    workloads = [chemical_workload(device), conv_workload(device), transformer_workload(device)]
    print(f"device {device}, torch {torch.__version__}, {args.threads} thread(s), Adam")
    print("\ncheck: one tracked step vs exact lookahead at lr 1e-6 (float64)")
    for workload in workloads:
        gap = check_against_exact(workload)
        status = "ok" if gap < 1e-3 else "MISMATCH"
        print(f"  {workload.name:30s} max relative gap {gap:.2e}  {status}")

    header = (
        f"\n{'workload':30s} {'plain ms':>9s} {'every=1':>9s} {'every=10':>9s} {'exact':>9s}"
        f" {'added(1)/added(exact)':>22s} {'added(10)/plain':>16s} {'corr step':>10s}"
        f" {'corr mean':>10s}"
    )
    print(header)
    for workload in workloads:
        per_step = benchmark(workload, device, args.rounds, args.steps)
        added = {method: per_step[method] - per_step["plain"] for method in METHODS}
        ratio_exact = added["every=1"] / added["exact"] if added["exact"] > 0 else math.nan
        ratio_plain = added["every=10"] / per_step["plain"]
        corr_step, corr_mean = correlation_over_run(workload, args.correlation_steps)
        print(
            f"{workload.name:30s} {1e3 * per_step['plain']:9.2f} {1e3 * per_step['every=1']:9.2f}"
            f" {1e3 * per_step['every=10']:9.2f} {1e3 * per_step['exact']:9.2f}"
            f" {ratio_exact:22.2f} {ratio_plain:16.1%} {corr_step:10.3f} {corr_mean:10.3f}"
        )
    print(
        "\ntargets: added(1)/added(exact) <= 0.50; added(10)/plain <= 15%. "
        "Times are medians over rounds; the machine may be shared, so expect noise."
    )


if __name__ == "__main__":
    main()
