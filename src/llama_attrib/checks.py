"""How far a sum of components may be from what it explains, and how far it is."""

from __future__ import annotations

import torch
from torch import Tensor


def tolerance(dtype: torch.dtype, rounded: bool = False) -> float:
    """How far a sum of components may be from what it explains, relative to the largest
    value: float32 1e-5 (measured 1.7e-6 at most, scripts/measure_guards.py), float64 1e-6,
    half precision 5e-2 (the model's own rounding), and float32 computed with products or
    kernels that round like half precision (``rounded``: TF32, bitsandbytes' bfloat16 CPU
    kernel) as half precision."""
    if rounded and dtype == torch.float32:
        return 5e-2
    return {torch.float64: 1e-6, torch.float32: 1e-5}.get(dtype, 5e-2)


def tf32_products(t: torch.Tensor) -> bool:
    """Whether float32 products on ``t``'s device run in TF32 now (CUDA, precision not "highest")."""
    return t.is_cuda and torch.get_float32_matmul_precision() != "highest"


def completeness_error(real: Tensor, comps: Tensor) -> float:
    """Largest ``|sum(components) - real|`` relative to the largest ``|real|``."""
    if real.numel() == 0:
        return 0.0
    total = comps.sum(0).to(torch.float64)
    scale = real.abs().max().clamp(min=1e-30).double()
    return float(((total - real.double()).abs().max() / scale).item())
