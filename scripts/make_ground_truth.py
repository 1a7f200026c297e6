"""Train every group of the bundled datasets over several seeds and write the gain tables.

    nice -n 10 python scripts/make_ground_truth.py

writes ``etap_torch/data/ground_truth/{chemical,etth1}.npz`` and ``.json``. Each (dataset, seed)
is cached under ``--cache`` as soon as it finishes, so an interrupted run resumes where it
stopped; the recorded cost is the sum of the training time of every (dataset, seed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etap_torch.gains import gains_from_losses, noise_ceiling  # noqa: E402
from etap_torch.trainers import all_groups, load_dataset, recipe_for, train_groups  # noqa: E402


def save_atomically(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial.npz")
    np.savez_compressed(temporary, **arrays)
    os.replace(temporary, path)


def machine() -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, {os.cpu_count()} logical cores shared with other jobs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"{platform.system()} {platform.machine()}"
    )


def train_seed(name: str, seed: int, cache: Path) -> dict[str, np.ndarray]:
    path = cache / f"{name}_seed{seed}.npz"
    if path.exists():
        with np.load(path) as stored:
            return dict(stored)
    data = load_dataset(name)
    groups = all_groups(data.num_tasks)
    started = time.perf_counter()

    def report(epoch: int, training: int) -> None:
        elapsed = time.perf_counter() - started
        print(
            f"{name} seed {seed}: epoch {epoch}, {training} groups training, {elapsed:.0f} s",
            flush=True,
        )

    result = train_groups(data, groups, recipe_for(name), seed, on_epoch=report)
    arrays = {
        "test_losses": result.test_losses.numpy(),
        "validation_losses": result.validation_losses.numpy(),
        "best_epoch": result.best_epoch.numpy(),
        "epochs": result.epochs.numpy(),
        "seconds": np.array(time.perf_counter() - started),
    }
    save_atomically(path, **arrays)
    return arrays


def make_table(name: str, seeds: list[int], cache: Path, out: Path, command: str) -> dict:
    data = load_dataset(name)
    groups = all_groups(data.num_tasks)
    per_seed = [train_seed(name, seed, cache) for seed in seeds]
    test_losses = torch.from_numpy(np.stack([s["test_losses"] for s in per_seed]))
    gains = gains_from_losses(groups, test_losses)
    ceiling = noise_ceiling(groups, gains)
    seconds = float(sum(float(s["seconds"]) for s in per_seed))
    metadata = {
        "dataset": name,
        "task_names": data.task_names,
        "seeds": seeds,
        "num_groups": int(groups.shape[0]),
        "command": command,
        "training_seconds": round(seconds, 1),
        "machine": machine(),
        "recipe": recipe_for(name).to_dict(),
        "loader": {k: v for k, v in data.info.items() if isinstance(v, (int, float, tuple))},
        "noise_ceiling": ceiling,
        "mean_best_epoch": float(np.mean([s["best_epoch"].mean() for s in per_seed])),
        "mean_epochs": float(np.mean([s["epochs"].mean() for s in per_seed])),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_atomically(
        out / f"{name}.npz",
        task_names=np.array(data.task_names),
        groups=groups.numpy(),
        gains=gains.numpy(),
        test_losses=test_losses.numpy(),
        validation_losses=np.stack([s["validation_losses"] for s in per_seed]),
        best_epoch=np.stack([s["best_epoch"] for s in per_seed]).astype(np.int16),
        epochs=np.stack([s["epochs"] for s in per_seed]).astype(np.int16),
        seeds=np.array(seeds),
        metadata=np.array(json.dumps(metadata)),
    )
    (out / f"{name}.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["chemical", "etth1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=REPO / ".etap_cache" / "ground_truth")
    parser.add_argument("--out", type=Path, default=REPO / "etap_torch" / "data" / "ground_truth")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    command = "python scripts/make_ground_truth.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    for name in args.datasets:
        metadata = make_table(name, args.seeds, args.cache, args.out, command.strip())
        print(
            json.dumps({k: metadata[k] for k in ("dataset", "training_seconds", "noise_ceiling")}),
            flush=True,
        )
    print(f"wall time of this run: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
