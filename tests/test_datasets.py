"""The dataset loaders return the documented splits, checked against the raw files."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from etap_torch.datasets import CHEMICAL_TASKS, ETTH1_TASKS, load_chemical, load_etth1
from etap_torch.datasets.chemical import stratified_split

DATA = Path(__file__).resolve().parent.parent / "etap_torch" / "data"


@pytest.fixture(scope="module")
def chemical():
    return load_chemical()


@pytest.fixture(scope="module")
def etth1_raw():
    with open(DATA / "ett" / "ETTh1.csv") as handle:
        rows = list(csv.reader(handle))
    return rows[0], np.array([[float(v) for v in row[1:]] for row in rows[1:]])


def test_chemical_tasks_shapes_and_sizes(chemical):
    assert chemical.task_names == list(CHEMICAL_TASKS)
    assert CHEMICAL_TASKS == ("83", "78", "84", "85", "76", "86", "81", "80", "87", "55")
    for task in chemical.tasks:
        raw_train = np.load(DATA / "chemical" / f"{task.name}_y_train.npy")
        raw_test = np.load(DATA / "chemical" / f"{task.name}_y_test.npy")
        assert len(task.train) + len(task.validation) == raw_train.size
        assert len(task.test) == raw_test.size
        for split in (task.train, task.validation, task.test):
            assert split.inputs.shape == (len(split), 180)
            assert split.targets.shape == (len(split),)
            assert split.inputs.dtype == torch.float32


def test_chemical_validation_is_stratified_and_disjoint(chemical):
    for task in chemical.tasks:
        raw_inputs = np.load(DATA / "chemical" / f"{task.name}_X_train.npy")
        raw_labels = np.load(DATA / "chemical" / f"{task.name}_y_train.npy")
        for label in (0, 1):
            expected = round(0.1 * int((raw_labels == label).sum()))
            assert int((task.validation.targets == label).sum()) == expected
        # Rows of train and validation together are the raw train rows, each once.
        together = torch.cat([task.train.inputs, task.validation.inputs]).double().numpy()
        labels = torch.cat([task.train.targets, task.validation.targets]).long().numpy()
        raw_rows = sorted(map(tuple, np.column_stack([raw_inputs, raw_labels])))
        ours = sorted(map(tuple, np.column_stack([together, labels])))
        assert raw_rows == ours
        test_inputs = np.load(DATA / "chemical" / f"{task.name}_X_test.npy")
        np.testing.assert_array_equal(task.test.inputs.numpy(), test_inputs)


def test_chemical_split_depends_on_seed_only():
    first, again, other = load_chemical(split_seed=0), load_chemical(), load_chemical(split_seed=1)
    assert torch.equal(first[3].validation.inputs, again[3].validation.inputs)
    assert not torch.equal(first[3].validation.inputs, other[3].validation.inputs)


def test_stratified_split_partitions():
    labels = np.array([0] * 13 + [1] * 7 + [2] * 30)
    kept, held_out = stratified_split(labels, 0.2, np.random.default_rng(3))
    assert np.array_equal(np.sort(np.concatenate([kept, held_out])), np.arange(labels.size))
    assert [int((labels[held_out] == c).sum()) for c in (0, 1, 2)] == [3, 1, 6]


def test_chemical_rejects_bad_fraction():
    with pytest.raises(ValueError, match="validation_fraction"):
        load_chemical(validation_fraction=1.0)


def test_etth1_splits_windows_and_standardisation(etth1_raw):
    header, raw = etth1_raw
    assert header[1:] == list(ETTH1_TASKS)
    data = load_etth1(history=96, horizon=24)
    assert data.task_names == list(ETTH1_TASKS)
    train_rows, validation_rows = 12 * 30 * 24, 4 * 30 * 24
    mean = raw[:train_rows].mean(axis=0)
    std = raw[:train_rows].std(axis=0)
    np.testing.assert_allclose(data.info["mean"].numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(data.info["std"].numpy(), std, rtol=1e-12)
    for column, task in enumerate(data.tasks):
        assert task.train.inputs.shape == (train_rows - 120 + 1, 96)
        assert task.train.targets.shape == (train_rows - 120 + 1, 24)
        assert task.validation.inputs.shape == (validation_rows - 24 + 1, 96)
        assert task.test.inputs.shape == (validation_rows - 24 + 1, 96)
        scaled = (raw[:, column] - mean[column]) / std[column]
        # Train windows start at row 0; validation targets start at the first validation row,
        # test targets at the first test row; the last test target is the last test row.
        np.testing.assert_allclose(task.train.inputs[0].numpy(), scaled[:96], atol=1e-5)
        np.testing.assert_allclose(task.train.targets[0].numpy(), scaled[96:120], atol=1e-5)
        first_validation = train_rows
        np.testing.assert_allclose(
            task.validation.targets[0].numpy(),
            scaled[first_validation : first_validation + 24],
            atol=1e-5,
        )
        np.testing.assert_allclose(
            task.validation.inputs[0].numpy(),
            scaled[first_validation - 96 : first_validation],
            atol=1e-5,
        )
        test_end = train_rows + 2 * validation_rows
        np.testing.assert_allclose(
            task.test.targets[-1].numpy(), scaled[test_end - 24 : test_end], atol=1e-5
        )
        # Train inputs are standardised with train statistics: mean 0, std 1 over train rows.
        train_values = torch.cat(
            [task.train.inputs[:, 0], task.train.inputs[-1, 1:], task.train.targets[-1]]
        ).double()
        assert train_values.numel() == train_rows
        assert abs(float(train_values.mean())) < 1e-5
        assert abs(float(train_values.std(unbiased=False)) - 1) < 1e-5


def test_etth1_next_step_and_validation_stride():
    full = load_etth1(history=48, horizon=1)
    strided = load_etth1(history=48, horizon=1, validation_stride=4)
    assert full[6].train.targets.shape[1] == 1
    assert torch.equal(strided[6].validation.inputs, full[6].validation.inputs[::4])
    assert torch.equal(strided[6].test.inputs, full[6].test.inputs)


def test_etth1_rejects_bad_settings():
    with pytest.raises(ValueError, match="horizon"):
        load_etth1(horizon=0)
