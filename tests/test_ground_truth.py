"""The committed ground-truth tables load and are consistent with their own losses."""

import numpy as np
import pytest
import torch

from etap_torch.datasets import CHEMICAL_TASKS, ETTH1_TASKS, load_ground_truth

EXPECTED = {"chemical": list(CHEMICAL_TASKS), "etth1": list(ETTH1_TASKS)}


@pytest.fixture(scope="module", params=["chemical", "etth1"])
def truth(request):
    return load_ground_truth(request.param)


def test_shapes_and_names(truth):
    names = EXPECTED[truth.name]
    num_tasks, num_groups = len(names), 2 ** len(names) - 1
    assert truth.task_names == names
    assert truth.seeds == [0, 1, 2]
    assert truth.groups.shape == (num_groups, num_tasks)
    assert truth.groups.dtype == torch.bool
    for table in (truth.gains, truth.test_losses, truth.validation_losses):
        assert table.shape == (3, num_groups, num_tasks)
        assert table.dtype == torch.float64
        assert bool(torch.isfinite(table).all())


def test_membership_is_every_group_by_bitmask(truth):
    num_tasks = truth.groups.shape[1]
    masks = (truth.groups.long() << torch.arange(num_tasks)).sum(dim=1)
    assert masks.tolist() == list(range(1, 2**num_tasks))


def test_losses_live_on_the_membership(truth):
    members = truth.groups.expand_as(truth.test_losses)
    assert bool((truth.test_losses[members] > 0).all())
    assert bool((truth.test_losses[~members] == 0).all())
    assert bool((truth.gains[~members] == 0).all())


def test_singles_have_gain_exactly_zero(truth):
    singles = truth.groups.sum(dim=1) == 1
    assert int(singles.sum()) == truth.groups.shape[1]
    assert bool((truth.gains[:, singles] == 0).all())


def test_gains_follow_from_the_losses(truth):
    losses = truth.test_losses.numpy()
    groups = truth.groups.numpy()
    rows = {int(np.flatnonzero(g)[0]): r for r, g in enumerate(groups) if g.sum() == 1}
    expected = np.zeros_like(losses)
    for row, group in enumerate(groups):
        for task in np.flatnonzero(group):
            single = losses[:, rows[task], task]
            expected[:, row, task] = (single - losses[:, row, task]) / single
    np.testing.assert_allclose(truth.gains.numpy(), expected, rtol=0, atol=1e-12)


def test_metadata_states_command_cost_and_noise_ceiling(truth):
    assert "make_ground_truth.py" in truth.command
    assert truth.cost_seconds > 0
    entries = truth.groups & (truth.groups.sum(dim=1, keepdim=True) >= 2)
    values = truth.gains[:, entries].numpy()
    pairs = [np.corrcoef(values[a], values[b])[0, 1] for a, b in ((0, 1), (0, 2), (1, 2))]
    assert abs(truth.noise_ceiling["pairwise"] - float(np.mean(pairs))) < 1e-9
    assert -1 <= truth.noise_ceiling["one_vs_rest"] <= 1


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="name"):
        load_ground_truth("mnist")
