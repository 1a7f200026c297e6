"""Registers the float64 references as CPU kernels while the fused kernels are missing."""

import reference
import torch

import etap_torch  # noqa: F401

for name in ("affinity", "affinity_sgd", "affinity_adam"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"etap::{name}", "CPU"):
        torch.library.impl(f"etap::{name}", "CPU")(getattr(reference, name))
