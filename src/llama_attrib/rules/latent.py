"""Multi-head latent attention's values (DeepSeek-V2/V3, Kimi K2).

The keys and values are expanded from a compressed latent: ``c = norm(x W_a + b_a)`` (the
first ``kv_lora_rank`` rows of ``kv_a_proj_with_mqa``; the rest is the decoupled rotary key,
which only the probabilities see), then ``kv_b_proj`` gives each head its key and value rows.
With the latent norm's scale frozen from the real hidden state, as every norm's is, the value
is a linear map of the input plus a bias::

    v = W_bv (f * (x W_a))  +  W_bv (f * b_a),     f = weight / rms(real latent)

so the frozen probabilities mix the components' values exactly as a plain value projection's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .linear import Proj, scale
from .norm import RMSNorm


def _rank_rows(owner: Any) -> slice:
    return slice(0, int(owner.kv_lora_rank))  # the latent's rows, before the rotary key's


def _value_rows(owner: Any) -> Tensor:
    """``kv_b_proj``'s value rows: per head its ``qk_nope_head_dim`` key rows, then its values."""
    nope, v = int(owner.qk_nope_head_dim), int(owner.v_head_dim)
    heads = owner.kv_b_proj.out_features // (nope + v)
    per_head = torch.arange(nope, nope + v)
    return (torch.arange(heads)[:, None] * (nope + v) + per_head).reshape(-1)


@dataclass(frozen=True)
class LatentValue:
    """The value map of a latent attention (attribute names as transformers' DeepSeek-V3)."""

    down: Proj = field(default_factory=lambda: Proj("kv_a_proj_with_mqa", _rank_rows))
    norm: str = "kv_a_layernorm"
    up: Proj = field(default_factory=lambda: Proj("kv_b_proj", _value_rows))

    def bind(self, owner: nn.Module, real: Tensor) -> BoundLatentValue:
        """The map with its norm's scale frozen from ``real`` (the attention's real input)."""
        with torch.no_grad():
            latent = self.down.affine(owner, real)
            factor = RMSNorm().factor(owner.get_submodule(self.norm), latent, torch.float32)
        return BoundLatentValue(self, factor)


@dataclass(frozen=True)
class BoundLatentValue:
    """:class:`LatentValue` at one call: ``factor [B, q, rank]`` frozen."""

    rule: LatentValue
    factor: Tensor

    def linear(self, owner: nn.Module, x: Tensor, t0: int = 0) -> Tensor:
        """The bias-free map of ``x`` (positions ``t0 :`` of the call)."""
        latent = self.rule.down.linear(owner, x)
        return self.rule.up.linear(owner, scale(latent, self.factor.to(latent), t0))

    def bias(self, owner: nn.Module) -> Tensor | None:
        """``W_bv (f * b_a)`` per position ``[B, q, heads * v]``, or None without ``b_a``."""
        b = self.rule.down.bias(owner)
        if b is None:
            return None
        return self.rule.up.linear(owner, self.factor * b.to(self.factor))
