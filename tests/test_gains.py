"""collect_gains: gains against a hand-computed table, resuming from its cache, bad inputs."""

import json

import numpy as np
import pytest
import torch

from etap_torch import collect_gains, gains_from_losses
from etap_torch.gains import noise_ceiling

# Loss of each member per group, seed 0; seed s adds s to every loss.
TOY_LOSSES = {
    ("a",): {"a": 2.0},
    ("b",): {"b": 4.0},
    ("c",): {"c": 1.0},
    ("a", "b"): {"a": 1.5, "b": 5.0},
    ("a", "b", "c"): {"a": 1.0, "b": 3.0, "c": 1.5},
}


def toy_train(members, seed):
    return {task: loss + seed for task, loss in TOY_LOSSES[members].items()}


class CountingTrain:
    def __init__(self, fail_after=None):
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, members, seed):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append((members, seed))
        return [toy_train(members, seed)[task] for task in members]


def expected_gains(seed):
    """Worked by hand: gain = (single - group) / single."""
    s = seed
    return torch.tensor(
        [
            [(2 + s - (1.5 + s)) / (2 + s), (4 + s - (5 + s)) / (4 + s), 0.0],
            [
                (2 + s - (1 + s)) / (2 + s),
                (4 + s - (3 + s)) / (4 + s),
                (1 + s - (1.5 + s)) / (1 + s),
            ],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )


def test_gains_match_hand_computed_table():
    table = collect_gains(
        toy_train,
        ["a", "b", "c"],
        [["a", "b"], ["a", "b", "c"]],
        seeds=(0, 1),
        workers=0,
        progress=False,
    )
    # The requested groups first, then the singles that were added.
    expected_groups = torch.tensor(
        [[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(table.groups, expected_groups)
    assert table.seeds == [0, 1]
    assert table.gains.shape == (2, 5, 3)
    torch.testing.assert_close(table.gains[0], expected_gains(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(table.gains[1], expected_gains(1), rtol=0, atol=1e-15)
    assert float(table.gains[0, 0, 0]) == 0.25
    assert float(table.losses[1, 1, 2]) == 2.5
    assert float(table.losses[0, 0, 2]) == 0.0


def test_gains_with_workers_equal_in_process():
    groups = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    serial = collect_gains(
        toy_train, ["a", "b", "c"], groups, seeds=(0, 2), workers=0, progress=False
    )
    parallel = collect_gains(
        toy_train, ["a", "b", "c"], groups, seeds=(0, 2), workers=2, progress=False
    )
    assert torch.equal(serial.gains, parallel.gains)
    assert torch.equal(serial.losses, parallel.losses)


def test_resumes_from_cache_without_retraining(tmp_path):
    groups = [["a", "b"], ["a", "b", "c"]]
    interrupted = CountingTrain(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        collect_gains(
            interrupted,
            ["a", "b", "c"],
            groups,
            seeds=(0, 1),
            cache_dir=tmp_path,
            workers=0,
            progress=False,
        )
    assert len(interrupted.calls) == 4
    assert len(list(tmp_path.glob("*.json"))) == 4
    assert not list(tmp_path.glob("*.tmp"))

    resumed = CountingTrain()
    table = collect_gains(
        resumed,
        ["a", "b", "c"],
        groups,
        seeds=(0, 1),
        cache_dir=tmp_path,
        workers=0,
        progress=False,
    )
    assert len(resumed.calls) == 10 - 4
    assert not set(resumed.calls) & set(interrupted.calls)
    torch.testing.assert_close(table.gains[1], expected_gains(1), rtol=0, atol=1e-15)

    again = CountingTrain()
    collect_gains(
        again, ["a", "b", "c"], groups, seeds=(0, 1), cache_dir=tmp_path, workers=0, progress=False
    )
    assert again.calls == []


def test_cache_of_other_tasks_is_refused(tmp_path):
    collect_gains(
        toy_train,
        ["a", "b", "c"],
        [["a", "b"]],
        seeds=(0,),
        cache_dir=tmp_path,
        workers=0,
        progress=False,
    )
    for path in tmp_path.glob("*.json"):
        record = json.loads(path.read_text())
        record["members"] = ["x"]
        path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="cache_dir"):
        collect_gains(
            toy_train,
            ["a", "b", "c"],
            [["a", "b"]],
            seeds=(0,),
            cache_dir=tmp_path,
            workers=0,
            progress=False,
        )


@pytest.mark.parametrize(
    ("tasks", "groups", "match"),
    [
        (["a", "a"], [["a"]], "tasks"),
        (["a", "b"], torch.ones(2, 3, dtype=torch.bool), "groups"),
        (["a", "b"], [[]], "empty group"),
        (["a", "b"], [["a", "z"]], "groups"),
        (["a", "b"], [["a", "b"], ["b", "a"]], "repeated"),
        (["a", "b"], torch.tensor([[2, 0]]), "0/1"),
    ],
)
def test_bad_inputs(tasks, groups, match):
    with pytest.raises(ValueError, match=match):
        collect_gains(toy_train, tasks, groups, seeds=(0,), workers=0, progress=False)


def test_bad_train_results():
    def wrong_length(members, seed):
        return [1.0]

    def not_finite(members, seed):
        return [float("nan")] * len(members)

    with pytest.raises(ValueError, match="2 losses"):
        collect_gains(wrong_length, ["a", "b"], [["a", "b"]], seeds=(0,), workers=0, progress=False)
    with pytest.raises(ValueError, match="positive finite"):
        collect_gains(not_finite, ["a", "b"], [["a", "b"]], seeds=(0,), workers=0, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        collect_gains(toy_train, ["a", "b"], [["a", "b"]], seeds=(), workers=0, progress=False)


def test_gains_from_losses_brute_force():
    generator = torch.Generator().manual_seed(0)
    masks = torch.arange(1, 16)
    groups = (masks[:, None] >> torch.arange(4)) & 1 == 1
    losses = torch.rand(3, 15, 4, generator=generator, dtype=torch.float64) + 0.5
    gains = gains_from_losses(groups, losses)
    for seed in range(3):
        for row in range(15):
            for task in range(4):
                if not groups[row, task]:
                    assert gains[seed, row, task] == 0
                    continue
                single = losses[seed, int(masks.tolist().index(1 << task)), task]
                expected = (single - losses[seed, row, task]) / single
                assert abs(float(gains[seed, row, task] - expected)) < 1e-15
    single_rows = groups.sum(dim=1) == 1
    assert bool((gains[:, single_rows] == 0).all())


def test_gains_from_losses_needs_singles():
    groups = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="single-task group"):
        gains_from_losses(groups, torch.ones(2, 2))


def test_noise_ceiling_against_pearson_by_hand():
    generator = torch.Generator().manual_seed(1)
    groups = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    gains = torch.randn(3, 5, 3, generator=generator, dtype=torch.float64) * groups
    gains[:, 2:] = 0
    entries = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    values = np.array([[float(gains[s, r, t]) for r, t in entries] for s in range(3)])

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))

    pairs = [
        pearson(values[0], values[1]),
        pearson(values[0], values[2]),
        pearson(values[1], values[2]),
    ]
    rest = [pearson(values[s], np.delete(values, s, axis=0).mean(axis=0)) for s in range(3)]
    ceiling = noise_ceiling(groups, gains)
    assert ceiling["entries"] == 5
    assert abs(ceiling["pairwise"] - np.mean(pairs)) < 1e-12
    assert abs(ceiling["one_vs_rest"] - np.mean(rest)) < 1e-12
