"""Float64 oracles and input builders shared by the tests of the affinity operators."""

from __future__ import annotations

import pytest
import torch

import etap_torch

CUDA_READY = torch.cuda.is_available() and etap_torch.built_with_cuda()

# Every test of the op family runs on each device; CUDA skips visibly without a GPU.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(
            not CUDA_READY, reason="needs a visible GPU and etap_torch built with CUDA"
        ),
    ),
]

FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Ways a tensor of a given logical shape can sit in memory.
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "permuted", "channels_last"]


def random_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: str,
    generator: torch.Generator,
    device: str = "cpu",
) -> torch.Tensor:
    """A random tensor of logical shape ``shape`` stored in the given layout.

    ``transposed`` swaps the storage of the last two dimensions, ``sliced`` takes every
    other element of a larger tensor at an offset, ``expanded`` repeats one value along the
    last dimension with stride 0, ``permuted`` stores the dimensions in reverse order (dense,
    not contiguous), ``channels_last`` applies to 4-d shapes. Shapes a layout does not apply
    to come back contiguous.
    """

    def draw(size: tuple[int, ...]) -> torch.Tensor:
        values = torch.randn(size, generator=generator, dtype=torch.float64)
        return values.to(dtype=dtype, device=device)

    if layout == "transposed" and len(shape) >= 2:
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return draw(swapped).transpose(-1, -2)
    if layout == "sliced" and len(shape) >= 1:
        wide = (*shape[:-1], 2 * shape[-1] + 3)
        return draw(wide)[..., 3::2]
    if layout == "expanded" and len(shape) >= 1:
        return draw((*shape[:-1], 1)).expand(shape)
    if layout == "permuted" and len(shape) >= 2:
        order = tuple(reversed(range(len(shape))))
        return draw(tuple(shape[d] for d in order)).permute(order)
    if layout == "channels_last" and len(shape) == 4:
        return draw(shape).contiguous(memory_format=torch.channels_last)
    return draw(shape)


def random_losses(num_tasks: int, generator: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """Positive losses ``[T]`` in [0.5, 1.5)."""
    return (
        (torch.rand(num_tasks, generator=generator, dtype=torch.float64) + 0.5)
        .to(torch.float32)
        .to(device)
    )


def reference_affinity(
    grads: list[torch.Tensor], directions: list[torch.Tensor], losses: torch.Tensor
) -> torch.Tensor:
    """Float64 oracle: ``A[s, t] = sum_k <grads[k][t], directions[k][s]> / losses[t]``.

    ``grads[k]`` and ``directions[k]`` are ``[T, *shape_k]``; ``losses`` is ``[T]``. A column
    whose loss is not finite or not positive is zero.
    """
    num_tasks = losses.shape[0]
    raw = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for grad, direction in zip(grads, directions, strict=True):
        grad_rows = grad.detach().cpu().double().reshape(num_tasks, -1)
        direction_rows = direction.detach().cpu().double().reshape(num_tasks, -1)
        raw += direction_rows @ grad_rows.T
    loss = losses.detach().cpu().double()
    usable = torch.isfinite(loss) & (loss > 0)
    return torch.where(usable, raw / torch.where(usable, loss, 1.0), 0.0)


def reference_magnitude(
    grads: list[torch.Tensor], directions: list[torch.Tensor], losses: torch.Tensor
) -> torch.Tensor:
    """``sum_k <|grads[k][t]|, |directions[k][s]|> / |losses[t]|``: the scale that bounds
    the rounding error of each entry."""
    return reference_affinity([g.abs() for g in grads], [d.abs() for d in directions], losses.abs())


def assert_matches_reference(
    result: torch.Tensor, reference: torch.Tensor, magnitude: torch.Tensor
) -> None:
    """Each entry within a few accumulation roundings (of the output dtype) of the oracle."""
    assert result.shape == reference.shape
    unit = 1e-12 if result.dtype == torch.float64 else 2e-5
    error = (result.detach().cpu().double() - reference).abs()
    bound = unit * magnitude + 1e-30
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g}x the bound; max error {error.max().item():.3g}"


def expected_dtype(tensors: list[torch.Tensor | None], losses: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise."""
    dtypes = [t.dtype for t in tensors if t is not None] + [losses.dtype]
    return torch.float64 if torch.float64 in dtypes else torch.float32
