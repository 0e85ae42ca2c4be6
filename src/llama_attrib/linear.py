"""The same rules as :mod:`rules`, written as one differentiable pass (target mode).

With the frozen factors (RMSNorm scales, attention probabilities, the SwiGLU gate) computed
from the real hidden state and *detached*, the network is a linear map of the token
embeddings: ``logit = sum_i J_i e_i``. One backward pass of a chosen logit gives every
``J_i``, and ``J_i . e_i`` is exactly token ``i``'s component in the forward mode. The values
of this pass are the real ones (detaching changes only the gradients); weights are detached
too, so no weight gradient is ever computed or kept.

Each function takes the real input ``x`` (a tensor that requires grad) and returns the real
output, in ``dtype`` (float32 for a half-precision model unless asked otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _offload
from .rules import _additive_mask, _rope


def _weight(layer: nn.Module, dtype: torch.dtype) -> Tensor:
    return _offload.weight(layer).to(dtype)


def linear(x: Tensor, layer: nn.Module) -> Tensor:
    """A bias-free ``nn.Linear`` with its weight detached, in ``x``'s precision."""
    return F.linear(x, _weight(layer, x.dtype))


def rms_norm(module: nn.Module, x: Tensor) -> Tensor:
    """``weight * x / rms(x)`` with ``1/rms(x)`` detached."""
    eps = float(module.variance_epsilon)  # type: ignore[arg-type]
    with torch.no_grad():
        scale = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
    return _weight(module, x.dtype) * (x * scale)


def mlp(module: nn.Module, x: Tensor) -> Tensor:
    """``down(act(gate(x)) * up(x))`` with the gate ``act(gate(x))`` detached."""
    with torch.no_grad():
        gate = module.act_fn(linear(x.detach(), module.gate_proj))  # type: ignore[operator, arg-type]
    return linear(gate * linear(x, module.up_proj), module.down_proj)  # type: ignore[arg-type]


def attention(
    module: nn.Module, x: Tensor, position_embeddings: tuple[Tensor, Tensor], mask: Tensor | None
) -> Tensor:
    """``o(softmax(q k^T) v)`` with the probabilities detached (float32, eager-style)."""
    batch, q, _ = x.shape
    hd = int(module.head_dim)  # type: ignore[arg-type]
    groups = int(module.num_key_value_groups)  # type: ignore[arg-type]
    with torch.no_grad():
        real = x.detach()
        queries = linear(real, module.q_proj).view(batch, q, -1, hd).transpose(1, 2)  # type: ignore[arg-type]
        keys = linear(real, module.k_proj).view(batch, q, -1, hd).transpose(1, 2)  # type: ignore[arg-type]
        cos, sin = position_embeddings
        queries, keys = _rope(module)(queries, keys, cos.to(x.dtype), sin.to(x.dtype))
        kv = keys.shape[1]
        queries = queries.to(torch.float32).reshape(batch, kv, groups * q, hd)
        scores = queries @ keys.to(torch.float32).transpose(-1, -2) * float(module.scaling)  # type: ignore[arg-type]
        scores = scores.view(batch, kv * groups, q, q) + _additive_mask(mask, batch, q, 0, x.device)
        probs = torch.softmax(scores, dim=-1).view(batch, kv, groups * q, q).to(x.dtype)
    values = linear(x, module.v_proj).view(batch, q, kv, hd).transpose(1, 2)  # type: ignore[arg-type]
    out = torch.matmul(probs, values)  # [B, kv, g*q, hd]
    out = out.view(batch, kv, groups, q, hd).permute(0, 3, 1, 2, 4).reshape(batch, q, kv * groups * hd)
    return linear(out, module.o_proj)  # type: ignore[arg-type]
