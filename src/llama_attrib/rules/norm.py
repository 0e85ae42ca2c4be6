"""The norms: RMSNorm and LayerNorm, each a frozen scale (and LayerNorm's linear centring)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import _offload
from .linear import norm_eps, scale


@dataclass(frozen=True)
class RMSNorm:
    """``x * (offset + weight) / rms(x)``, the scale frozen: ``x * factor``. ``offset`` is 1
    for the norms that scale by ``1 + weight`` (Gemma)."""

    offset: float = 0.0

    @torch.no_grad()
    def factor(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Tensor:
        """``[B, q, hidden]``: ``(offset + weight) / rms(real)``."""
        variance = real.to(torch.float32).pow(2).mean(-1, keepdim=True)
        weight = _offload.weight(module).to(device=real.device, dtype=torch.float32) + self.offset
        return (torch.rsqrt(variance + norm_eps(module)) * weight).to(dtype)

    def apply(self, factor: Tensor, x: Tensor, t0: int = 0) -> Tensor:
        return scale(x, factor, t0)

    def bias(self, module: nn.Module) -> Tensor | None:
        return None

    def read(self, factor: Tensor, vector: Tensor) -> Tensor:
        """What a read-out ``vector`` of the output reads of the input (the transpose of
        :meth:`apply` at one position)."""
        return vector * factor


@dataclass(frozen=True)
class LayerNorm:
    """``(x - mean(x)) * weight / std(x) + bias``: the centring is linear (each component is
    centred), the scale ``weight / std(real)`` is the frozen factor, the bias a bias share."""

    @torch.no_grad()
    def factor(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Tensor:
        """``[B, q, hidden]``: ``weight / sqrt(var(real) + eps)``."""
        variance = real.to(torch.float32).var(-1, unbiased=False, keepdim=True)
        weight = getattr(module, "weight", None)
        inverse = torch.rsqrt(variance + norm_eps(module))
        if weight is None:
            return inverse.expand(real.shape).to(dtype)
        return (inverse * _offload.weight(module).to(device=real.device, dtype=torch.float32)).to(dtype)

    def apply(self, factor: Tensor, x: Tensor, t0: int = 0) -> Tensor:
        return scale(x - x.mean(-1, keepdim=True), factor, t0)

    def bias(self, module: nn.Module) -> Tensor | None:
        b = getattr(module, "bias", None)
        return b.detach() if isinstance(b, Tensor) else None

    def read(self, factor: Tensor, vector: Tensor) -> Tensor:
        """What a read-out ``vector`` of the output reads of the input (the transpose of
        :meth:`apply` at one position: scaled, then centred)."""
        v = vector * factor
        return v - v.mean(-1, keepdim=True)


Norm = RMSNorm | LayerNorm
