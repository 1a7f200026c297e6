"""Turn per-task losses of trained groups into the gain table of learning together."""

from __future__ import annotations

import numpy as np
import torch


def gains_from_losses(groups: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The gain of every member of every group over its single-task model.

    ``gain(S, t) = (L_t({t}) - L_t(S)) / L_t({t})``; positive means the group helps ``t``.

    Args:
        groups: ``[N, T]`` bool membership; for every task used by some group the single-task
            group ``{t}`` must be one of the rows.
        losses: ``[..., N, T]`` held-out loss of each member (entries off the membership are
            ignored); leading dimensions (for example seeds) are kept.

    Returns:
        ``[..., N, T]`` float64 gains, exactly 0 off the membership and for single-task rows.
    """
    groups = torch.as_tensor(groups).bool()
    losses = torch.as_tensor(losses)
    if groups.dim() != 2:
        raise ValueError(
            f"Parameter `groups` should be a [N, T] membership matrix. Found shape "
            f"{tuple(groups.shape)}."
        )
    if losses.shape[-2:] != groups.shape:
        raise ValueError(
            f"Parameter `losses` should end with the shape of `groups` {tuple(groups.shape)}. "
            f"Found {tuple(losses.shape)}."
        )
    losses = losses.to(torch.float64)
    sizes = groups.sum(dim=1)
    single_rows = torch.full((groups.shape[1],), -1, dtype=torch.long)
    for row in (sizes == 1).nonzero().squeeze(1).tolist():
        single_rows[int(groups[row].nonzero())] = row
    used = groups.any(dim=0)
    missing = (used & (single_rows < 0)).nonzero().squeeze(1).tolist()
    if missing:
        raise ValueError(
            "Parameter `groups` should contain the single-task group of every task it uses. "
            f"Found none for tasks {missing}."
        )

    task_index = torch.arange(groups.shape[1])
    single_losses = losses[..., single_rows.clamp(min=0), task_index]  # [..., T]
    member_losses = losses.masked_fill(~groups, 0.0)
    member_single = single_losses.unsqueeze(-2).expand_as(losses)
    bad = groups & ~(torch.isfinite(member_single) & (member_single > 0))
    if bool(bad.any()):
        raise ValueError(
            "Parameter `losses` should hold a positive, finite single-task loss for every task "
            "used. Found a non-positive or non-finite one."
        )
    gains = (member_single - member_losses) / member_single
    return gains.masked_fill(~groups, 0.0)


def noise_ceiling(groups: torch.Tensor, gains: torch.Tensor) -> dict[str, float]:
    """How well gains measured with one seed agree with other seeds.

    Over the member entries of every group of two or more tasks:
    ``pairwise``: Pearson correlation between two seeds, averaged over seed pairs;
    ``one_vs_rest``: Pearson correlation of one seed with the mean of the other seeds, averaged
    over the held-out seed.

    Args:
        groups: ``[N, T]`` bool membership.
        gains: ``[seeds, N, T]`` (at least two seeds).
    """
    groups = torch.as_tensor(groups).bool()
    gains = torch.as_tensor(gains, dtype=torch.float64)
    if gains.dim() != 3 or gains.shape[0] < 2 or gains.shape[1:] != groups.shape:
        raise ValueError(
            f"Parameter `gains` should be [seeds >= 2, {groups.shape[0]}, {groups.shape[1]}]. "
            f"Found {tuple(gains.shape)}."
        )
    entries = groups & (groups.sum(dim=1, keepdim=True) >= 2)
    values = gains[:, entries].numpy()  # [seeds, entries]
    num_seeds = values.shape[0]
    pairwise = [
        np.corrcoef(values[a], values[b])[0, 1]
        for a in range(num_seeds)
        for b in range(a + 1, num_seeds)
    ]
    one_vs_rest = [
        np.corrcoef(values[a], np.delete(values, a, axis=0).mean(axis=0))[0, 1]
        for a in range(num_seeds)
    ]
    return {
        "pairwise": float(np.mean(pairwise)),
        "one_vs_rest": float(np.mean(one_vs_rest)),
        "entries": int(values.shape[1]),
    }
