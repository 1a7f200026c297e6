"""ETTh1: hourly electricity transformer load and oil temperature, one forecasting task per
variable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from etap_torch.datasets._common import DATA_ROOT, MultiTaskData, Split, TaskData

ETTH1_TASKS: tuple[str, ...] = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")

HOURS_PER_MONTH = 30 * 24
TRAIN_HOURS = 12 * HOURS_PER_MONTH
VALIDATION_HOURS = 4 * HOURS_PER_MONTH
TEST_HOURS = 4 * HOURS_PER_MONTH


def read_etth1(path: str | Path | None = None) -> np.ndarray:
    """Read the seven variables of ETTh1.

    Returns:
        ``[rows, 7]`` float64 values in the column order of :data:`ETTH1_TASKS`.
    """
    csv = Path(path) if path is not None else DATA_ROOT / "ett" / "ETTh1.csv"
    with open(csv) as handle:
        header = handle.readline().strip().split(",")
    if header[1:] != list(ETTH1_TASKS):
        raise ValueError(
            f"Parameter `path` should name a CSV with columns date,{','.join(ETTH1_TASKS)}. "
            f"Found columns {header}."
        )
    return np.loadtxt(csv, delimiter=",", skiprows=1, usecols=range(1, 8), dtype=np.float64)


def sliding_windows(
    series: np.ndarray, first_target: int, end: int, history: int, horizon: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut every window whose targets lie in ``[first_target, end)``.

    Args:
        series: ``[rows]`` one variable.
        first_target: first row a target may fall on; the history may reach before it.
        end: one past the last row a target may fall on.

    Returns:
        ``(inputs [n, history], targets [n, horizon])`` with stride 1.
    """
    starts = np.arange(first_target - history, end - history - horizon + 1)
    starts = starts[starts >= 0]
    offsets = np.arange(history + horizon)
    windows = series[starts[:, None] + offsets[None, :]]
    return windows[:, :history], windows[:, history:]


def load_etth1(
    path: str | Path | None = None,
    *,
    history: int = 96,
    horizon: int = 24,
    validation_stride: int = 1,
    dtype: torch.dtype = torch.float32,
) -> MultiTaskData:
    """Load ETTh1 as 7 univariate forecasting tasks (HUFL, HULL, MUFL, MULL, LUFL, LULL, OT).

    Rows are split 12 / 4 / 4 months (of 30 days) into train / validation / test. Every
    variable is standardised with the mean and standard deviation of its train rows. A sample
    of task ``t`` is ``history`` consecutive standardised values of variable ``t`` followed by
    the next ``horizon`` values as target; windows have stride 1 and are assigned to the split
    their targets fall in (the history of the first validation and test windows reaches into
    the previous split, as is usual for this benchmark).

    Args:
        path: the ETTh1 CSV; the bundled copy by default.
        history: input length in hours.
        horizon: forecast length in hours (1 for next-step forecasting).
        validation_stride: keep every ``validation_stride``-th validation window (neighbouring
            windows overlap in all but one hour, so a stride makes early stopping cheaper at
            little cost in signal); train and test always keep every window.
        dtype: floating dtype of the tensors.

    Returns:
        :class:`MultiTaskData` with inputs ``[n, history]`` and targets ``[n, horizon]``;
        ``info`` holds ``mean`` and ``std`` (``[7]``, train statistics) and the settings.
    """
    if history < 1 or horizon < 1 or validation_stride < 1:
        raise ValueError(
            "Parameters `history`, `horizon` and `validation_stride` should be positive. "
            f"Found history={history}, horizon={horizon}, validation_stride={validation_stride}."
        )
    values = read_etth1(path)
    train_end = TRAIN_HOURS
    validation_end = train_end + VALIDATION_HOURS
    test_end = validation_end + TEST_HOURS
    if values.shape[0] < test_end:
        raise ValueError(
            f"Parameter `path` should hold at least {test_end} hourly rows. "
            f"Found {values.shape[0]}."
        )
    mean = values[:train_end].mean(axis=0)
    std = values[:train_end].std(axis=0)
    standardised = (values - mean) / std

    def split(series: np.ndarray, first_target: int, end: int, stride: int = 1) -> Split:
        inputs, targets = sliding_windows(series, first_target, end, history, horizon)
        inputs, targets = inputs[::stride], targets[::stride]
        return Split(torch.from_numpy(inputs).to(dtype), torch.from_numpy(targets).to(dtype))

    tasks = []
    for column, name in enumerate(ETTH1_TASKS):
        series = standardised[:, column]
        tasks.append(
            TaskData(
                name=name,
                train=split(series, history, train_end),
                validation=split(series, train_end, validation_end, validation_stride),
                test=split(series, validation_end, test_end),
            )
        )
    info = {
        "history": history,
        "horizon": horizon,
        "validation_stride": validation_stride,
        "mean": torch.from_numpy(mean),
        "std": torch.from_numpy(std),
        "split_rows": (train_end, validation_end, test_end),
    }
    return MultiTaskData("etth1", tasks, info)
