"""Benchmark the affinity operators against the plain PyTorch way and the memory floor.

For each number of tasks T and total shared-parameter count P (spread over the weight and
bias shapes of a small convolutional stem plus transformer blocks), the script times

- ``affinity``: the generic op with explicit update directions,
- ``affinity_sgd``: the SGD family (directions ``scale * g + offset``),
- ``affinity_adam``: the Adam family (AdamW state, directions formed on the fly),

and, in the same run, two baselines:

- plain: flatten and concatenate to ``[T, P]`` (forming the directions first for the fused
  families, as a user would), one matmul, divide by the losses;
- floor: the bytes the op must read once divided by the device's copy bandwidth, measured
  with a large ``Tensor.copy_`` (bytes read plus bytes written per second).

Every result is checked against a float64 reference (the plain way in float64, one parameter
at a time) before anything is timed. Columns: time of
the op, its effective bandwidth (bytes it must read / time), the fraction of the copy
bandwidth that is, the plain way's time and the speedup over it.

    python benchmarks/affinity_op.py --device cpu --quick
    python benchmarks/affinity_op.py --device cuda --tasks 4 10 16 32 --params 1M 16M 64M 256M
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from etap_torch import ops

MILLION = 1_000_000


def parse_count(text: str) -> int:
    """'16M' -> 16000000, '1.5M' -> 1500000, '4096' -> 4096."""
    text = text.strip().upper()
    if text.endswith("M"):
        return int(float(text[:-1]) * MILLION)
    return int(text)


def parameter_shapes(total: int) -> list[tuple[int, ...]]:
    """Shapes of a convolutional stem and transformer blocks totalling about `total` elements.

    A block of width d has qkv [3d, d], output [d, d], MLP [4d, d] and [d, 4d] weights, their
    biases and two layer norms (12 d^2 + 13 d elements); the width is chosen so that about
    five blocks fill the budget.
    """
    stem = [(64, 3, 7, 7), (64,), (64,), (64,)]
    budget = max(total - sum(math.prod(s) for s in stem), 0)
    width = max(16, 2 ** round(math.log2(math.sqrt(max(budget, 1) / 60))))
    per_block = 12 * width * width + 13 * width
    blocks = max(1, round(budget / per_block))
    block = [
        (width,), (width,),
        (3 * width, width), (3 * width,),
        (width, width), (width,),
        (width,), (width,),
        (4 * width, width), (4 * width,),
        (width, 4 * width), (width,),
    ]  # fmt: skip
    return stem + block * blocks


def best_time(function: Callable[[], object], repeats: int, synchronize: Callable[[], None]):
    """Minimum wall time over `repeats` calls, after one warm-up call."""
    function()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(device: str, synchronize: Callable[[], None], repeats: int) -> float:
    """Bytes read plus bytes written per second by a large contiguous copy."""
    elements = 32 * MILLION if device == "cpu" else 512 * MILLION
    source = torch.randn(elements, device=device)
    target = torch.empty_like(source)
    seconds = best_time(lambda: target.copy_(source), repeats, synchronize)
    return 2 * source.numel() * source.element_size() / seconds


def normalized(raw: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    usable = torch.isfinite(losses) & (losses > 0)
    return torch.where(usable, raw / torch.where(usable, losses, 1.0), 0.0)


def plain_affinity(grads, updates, losses):
    num_tasks = losses.shape[0]
    grad_rows = torch.cat([g.reshape(num_tasks, -1) for g in grads], dim=1)
    update_rows = torch.cat([u.reshape(num_tasks, -1) for u in updates], dim=1)
    return normalized(update_rows @ grad_rows.T, losses)


def plain_sgd(grads, scales, offsets, losses):
    num_tasks = losses.shape[0]
    directions = [
        scale * g + offset for g, scale, offset in zip(grads, scales, offsets, strict=True)
    ]
    grad_rows = torch.cat([g.reshape(num_tasks, -1) for g in grads], dim=1)
    direction_rows = torch.cat([d.reshape(num_tasks, -1) for d in directions], dim=1)
    return normalized(direction_rows @ grad_rows.T, losses)


def plain_adam(grads, params, exp_avgs, exp_avg_sqs, settings, losses):
    num_tasks = losses.shape[0]
    beta1, beta2, eps, weight_decay, step = settings
    bias1 = 1 - beta1 ** (step + 1)
    bias2 = 1 - beta2 ** (step + 1)
    directions = []
    for g, p, m, v in zip(grads, params, exp_avgs, exp_avg_sqs, strict=True):
        new_m = beta1 * m + (1 - beta1) * g
        new_v = beta2 * v + (1 - beta2) * g * g
        denominator = new_v.sqrt() / math.sqrt(bias2) + eps
        directions.append(new_m / bias1 / denominator + weight_decay * p)
    grad_rows = torch.cat([g.reshape(num_tasks, -1) for g in grads], dim=1)
    direction_rows = torch.cat([d.reshape(num_tasks, -1) for d in directions], dim=1)
    return normalized(direction_rows @ grad_rows.T, losses)


def float64_reference(plain: Callable, per_parameter_args: list[tuple], losses: torch.Tensor):
    """The plain way in float64, one parameter at a time (no [T, P] copy): the per-parameter
    affinities add up because the loss normalisation is linear."""
    total = None
    for args in per_parameter_args:
        double_args = [
            [t.double() if isinstance(t, torch.Tensor) else t for t in arg]
            if isinstance(arg, list)
            else arg
            for arg in args
        ]
        part = plain(*double_args, losses.double())
        total = part if total is None else total + part
    return total


def check(name: str, result: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    scale = expected.abs().max().item() + 1e-30
    error = (result.double() - expected).abs().max().item()
    if not error <= tolerance * scale:
        raise SystemExit(
            f"{name}: result differs from the float64 reference (max error {error:.3g}, "
            f"largest entry {scale:.3g})"
        )


def bench_case(args, num_tasks: int, total: int, bandwidth: float, synchronize) -> list[str]:
    device, dtype = args.device, getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = parameter_shapes(total)
    count = sum(math.prod(s) for s in shapes)
    element = torch.empty((), dtype=dtype).element_size()

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    grads = [randn(num_tasks, *s) for s in shapes]
    losses = torch.rand(num_tasks, generator=generator, device=device) + 0.5
    rows = []

    def run(name, op, plain, reference, bytes_read):
        # The op accumulates in blocks; the plain way's float32 matmul loses about
        # P * 2^-24 of its largest entries, so it gets a looser bound.
        expected = reference()
        check(f"{name} T={num_tasks} P={count}", op(), expected, 1e-4)
        check(f"plain {name} T={num_tasks} P={count}", plain(), expected, 1e-2)
        seconds = best_time(op, args.repeats, synchronize)
        plain_seconds = best_time(plain, max(1, args.repeats // 2), synchronize)
        achieved = bytes_read / seconds
        rows.append(
            f"{name:<14}{num_tasks:>4}{count / MILLION:>8.1f}{seconds * 1e3:>10.2f}"
            f"{achieved / 1e9:>9.2f}{achieved / bandwidth:>9.0%}"
            f"{plain_seconds * 1e3:>11.2f}{plain_seconds / seconds:>9.1f}x"
            f"{bandwidth / 1e9:>10.2f}"
        )
        print(rows[-1], flush=True)

    if "affinity" in args.ops:
        updates = [randn(num_tasks, *s) for s in shapes]
        run(
            "affinity",
            lambda: ops.affinity(grads, updates, losses),
            lambda: plain_affinity(grads, updates, losses),
            lambda: float64_reference(
                plain_affinity, [([g], [u]) for g, u in zip(grads, updates, strict=True)], losses
            ),
            2 * num_tasks * count * element,
        )
        del updates

    if "sgd" in args.ops:
        offsets = [randn(*s) for s in shapes]
        scales = [0.9] * len(shapes)
        run(
            "affinity_sgd",
            lambda: ops.affinity_sgd(grads, scales, offsets, losses),
            lambda: plain_sgd(grads, scales, offsets, losses),
            lambda: float64_reference(
                plain_sgd,
                [([g], [a], [c]) for g, a, c in zip(grads, scales, offsets, strict=True)],
                losses,
            ),
            (num_tasks + 1) * count * element,
        )
        del offsets

    if "adam" in args.ops:
        params = [randn(*s) for s in shapes]
        exp_avgs = [0.1 * randn(*s) for s in shapes]
        exp_avg_sqs = [randn(*s).abs() * 0.01 + 1e-4 for s in shapes]
        settings = (0.9, 0.999, 1e-8, 0.01, 10.0)
        k = len(shapes)
        run(
            "affinity_adam",
            lambda: ops.affinity_adam(
                grads, params, exp_avgs, exp_avg_sqs, [None] * k, [settings[0]] * k,
                [settings[1]] * k, [settings[2]] * k, [settings[3]] * k, [settings[4]] * k,
                [True] * k, [False] * k, [False] * k, losses,
            ),
            lambda: plain_adam(grads, params, exp_avgs, exp_avg_sqs, settings, losses),
            lambda: float64_reference(
                plain_adam,
                [
                    ([g], [p], [m], [v], settings)
                    for g, p, m, v in zip(grads, params, exp_avgs, exp_avg_sqs, strict=True)
                ],
                losses,
            ),
            (num_tasks + 3) * count * element,
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 10, 16, 32])
    parser.add_argument("--params", nargs="+", default=None, help="e.g. 1M 16M 64M")
    parser.add_argument("--ops", nargs="+", default=["affinity", "sgd", "adam"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--max-gb", type=float, default=None,
        help="skip cases whose gradients plus the plain way's copies exceed this (GB)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="T in {4, 10}, P in {1M, 4M}")
    args = parser.parse_args()

    if args.params is None:
        args.params = ["1M", "16M", "64M"] + (["256M"] if args.device == "cuda" else [])
    if args.quick:
        args.tasks, args.params, args.repeats = [4, 10], ["1M", "4M"], 2
    if args.max_gb is None:
        args.max_gb = 6.0 if args.device == "cpu" else 100.0

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, dtype {args.dtype}; "
        "copy GB/s (read + write) is measured again before each T and P"
    )
    print(
        f"{'op':<14}{'T':>4}{'P(M)':>8}{'op ms':>10}{'GB/s':>9}{'of copy':>9}"
        f"{'plain ms':>11}{'speedup':>10}{'copy GB/s':>10}"
    )
    for total in [parse_count(p) for p in args.params]:
        for num_tasks in args.tasks:
            footprint = 4 * num_tasks * total * element
            if footprint > args.max_gb * 1e9:
                print(f"{'(skipped)':<14}{num_tasks:>4}{total / MILLION:>8.1f}  needs about "
                      f"{footprint / 1e9:.0f} GB > --max-gb {args.max_gb:g}")  # fmt: skip
                continue
            bandwidth = copy_bandwidth(args.device, synchronize, repeats=5)
            bench_case(args, num_tasks, total, bandwidth, synchronize)


if __name__ == "__main__":
    main()
