"""Loads the compiled extension and says how to fix it when it cannot."""

from __future__ import annotations

import torch

try:
    from etap_torch import _C  # noqa: F401
except ImportError as error:
    raise ImportError(
        "etap_torch's compiled extension `etap_torch._C` could not be loaded "
        f"({error}). Build it from the repository root with "
        "`pip install --no-build-isolation -e .` (or `make build`) against the torch "
        f"installed now ({torch.__version__}), and rebuild after changing torch. "
        "For a CUDA mismatch, rebuild, or build for the CPU only with `ETAP_CPU_ONLY=1`."
    ) from error


def built_with_cuda() -> bool:
    """Whether this build of the extension contains the CUDA kernels."""
    return bool(torch.ops.etap.built_with_cuda())
