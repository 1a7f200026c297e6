"""The trainers: the batched trainer reproduces the single-group trainer, groups learn only from
their members, early stopping restores the best epoch, and the tracker runs inside."""

from dataclasses import replace

import pytest
import torch

from etap_torch.trainers import (
    CHEMICAL_RECIPE,
    ETTH1_RECIPE,
    all_groups,
    build_model,
    load_dataset,
    train_all_with_affinity,
    train_group,
    train_groups,
)


@pytest.fixture(scope="module")
def chemical():
    return load_dataset("chemical")


@pytest.fixture(scope="module")
def etth1():
    return load_dataset("etth1")


TINY_CHEMICAL = replace(
    CHEMICAL_RECIPE, learning_rate=5e-2, batch_size=16, steps_per_epoch=2, max_epochs=6, patience=1
)
TINY_ETTH1 = replace(ETTH1_RECIPE, batch_size=16, steps_per_epoch=2, max_epochs=3, patience=1)


def membership(rows, num_tasks):
    groups = torch.zeros(len(rows), num_tasks, dtype=torch.bool)
    for index, members in enumerate(rows):
        groups[index, members] = True
    return groups


@pytest.mark.parametrize("dataset", ["chemical", "etth1"])
def test_batched_trainer_reproduces_single_group_trainer(dataset, request):
    data = request.getfixturevalue(dataset)
    recipe = TINY_CHEMICAL if dataset == "chemical" else TINY_ETTH1
    rows = [[0, 1, 2], [4], [3, data.num_tasks - 1], list(range(data.num_tasks))]
    batched = train_groups(data, membership(rows, data.num_tasks), recipe, seed=5)
    stopped_at = set()
    for index, members in enumerate(rows):
        single = train_group(data, members, recipe, seed=5)
        assert int(batched.best_epoch[index]) == single.best_epoch
        assert int(batched.epochs[index]) == single.epochs
        stopped_at.add(single.epochs)
        torch.testing.assert_close(
            batched.test_losses[index, members].float(), single.test_losses, rtol=2e-4, atol=1e-6
        )
        off = torch.ones(data.num_tasks, dtype=torch.bool)
        off[members] = False
        assert bool((batched.test_losses[index, off] == 0).all())
    if dataset == "chemical":
        # Groups stopped at different epochs, so dropping finished groups was exercised.
        assert len(stopped_at) > 1


def test_group_learns_only_from_its_members(chemical):
    recipe = replace(TINY_CHEMICAL, max_epochs=2)
    groups = membership([[0, 2], [1]], chemical.num_tasks)
    reference = train_groups(chemical, groups, recipe, seed=0)
    chemical.tasks[1].train.inputs = chemical.tasks[1].train.inputs.flip(1).clone()
    try:
        changed = train_groups(chemical, groups, recipe, seed=0)
    finally:
        chemical.tasks[1].train.inputs = chemical.tasks[1].train.inputs.flip(1).clone()
    assert torch.equal(changed.test_losses[0], reference.test_losses[0])
    assert not torch.equal(changed.test_losses[1], reference.test_losses[1])


def test_early_stopping_restores_the_best_epoch(chemical):
    recipe = replace(TINY_CHEMICAL, learning_rate=3e-2, max_epochs=12, patience=3)
    result = train_group(chemical, [9], recipe, seed=1)
    best = min(result.history)
    assert result.history.index(best) + 1 == result.best_epoch
    assert result.epochs < recipe.max_epochs
    assert abs(float(result.validation_losses.sum()) - best) < 1e-6


def test_seeds_share_initialisation_across_groups():
    pair = build_model(CHEMICAL_RECIPE, [0, 3], 10, seed=2)
    single = build_model(CHEMICAL_RECIPE, [3], 10, seed=2)
    other_seed = build_model(CHEMICAL_RECIPE, [3], 10, seed=3)
    assert torch.equal(pair.trunk[0].weight, single.trunk[0].weight)
    assert torch.equal(pair.heads[1].weight, single.heads[0].weight)
    assert not torch.equal(single.trunk[0].weight, other_seed.trunk[0].weight)
    bound = 1 / 180**0.5
    assert float(single.trunk[0].weight.detach().abs().max()) <= bound


def test_all_tasks_model_with_tracker_gives_finite_affinity():
    calls = []
    recipe = replace(CHEMICAL_RECIPE, steps_per_epoch=4, max_epochs=1)
    affinity, test_losses = train_all_with_affinity(
        "chemical",
        recipe=recipe,
        every=2,
        on_batch=lambda model, compute_losses, optimizer: calls.append(len(compute_losses())),
    )
    assert affinity.shape == (10, 10)
    assert affinity.dtype == torch.float64
    assert bool(torch.isfinite(affinity).all())
    assert bool((affinity != 0).any())
    assert test_losses.shape == (10,)
    assert calls == [10] * 4


def test_exact_lookahead_through_the_hook():
    from etap_torch.lookahead import exact_lookahead

    lookaheads = []

    def measure(model, compute_losses, optimizer):
        shared = list(model.trunk.parameters())
        lookaheads.append(exact_lookahead(compute_losses, shared, optimizer, model=model))

    recipe = replace(ETTH1_RECIPE, batch_size=32, steps_per_epoch=2, max_epochs=1)
    affinity, _ = train_all_with_affinity("etth1", recipe=recipe, on_batch=measure)
    assert len(lookaheads) == 2
    assert all(z.shape == (7, 7) and bool(torch.isfinite(z).all()) for z in lookaheads)
    assert bool(torch.isfinite(affinity).all())


def test_bad_inputs(chemical):
    with pytest.raises(ValueError, match="members"):
        train_group(chemical, [0, 0], TINY_CHEMICAL, seed=0)
    with pytest.raises(ValueError, match="members"):
        train_group(chemical, [10], TINY_CHEMICAL, seed=0)
    with pytest.raises(ValueError, match="groups"):
        train_groups(chemical, all_groups(3), TINY_CHEMICAL, seed=0)
    with pytest.raises(ValueError, match="loss"):
        replace(TINY_CHEMICAL, loss="hinge")
