"""GPT-OSS's experts: a top-k mixture whose SwiGLU is clamped and offset.

Each chosen expert computes, from ``g = x W_g + b_g`` and ``u = x W_u + b_u`` (interleaved
columns of one fused ``[hidden, 2 * intermediate]`` weight, stored ``[in, out]``)::

    down((clamp(u, -L, L) + 1) * glu(min(g, L))) + b_down,   glu(g) = g * sigmoid(alpha * g)

and the block sums them weighted by the router's softmax over its top-k logits. Frozen from
the real input, as every gate is: the routing weight ``w`` and ``glu(min(g, L))`` (the gate's
side, clamp included); and which entries of ``u`` the clamp cuts (a 0/1 mask ``m``). So::

    (clamp(u) + 1) * glu = m * glu * (x W_u)  +  glu * (m * b_u + (1 - m) * clamp(u) + 1)

The first term carries the components through ``W_u`` and ``down``; the second holds no
token (the up bias, the clamp's constant where it cuts and the ``+ 1`` offset) and, with
``b_down``, is the bias share.

Under the uniform rule (AttnLRP) the product ``(clamp(u) + 1) * glu`` is credited half to
each side: through ``u`` as above (``glu`` frozen), and through the gate by the identity rule
on its whole element-wise chain, ``glu(min(g, L)) = g * r`` with ``r`` frozen (``clamp(u) + 1``
frozen); each routing weight times its expert's output half through the expert and half
through the router's softmax over its top-k logits (:func:`.mlp.through_router`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import scale
from .mlp import MoEUniform, identity_ratio, routing, through_router

Frozen = tuple[dict[int, Tensor], Tensor]  # per used expert w * m * glu [B, q, I]; the bias share


def _route(block: Any, flat: Tensor) -> tuple[Tensor, Tensor]:
    """The stock router's ``(weights [N, k], experts [N, k])``: 5.x returns ``(logits,
    weights, experts)``, 4.x ``(weights scattered over every expert [N, E], experts)``."""
    out = block.router(flat)
    if len(out) == 3:
        return out[1], out[2]
    dense, chosen = out
    return dense.gather(-1, chosen), chosen


@dataclass(frozen=True)
class ClampedExperts:
    """GPT-OSS's ``mlp``: ``router`` and fused ``experts`` (see the module's docstring)."""

    def _expert(self, module: nn.Module, e: int) -> tuple[Tensor, ...]:
        """Expert ``e``'s ``(W_g, b_g, W_u, b_u, W_down, b_down)``, weights ``[out, in]``."""
        experts: Any = module.experts
        gate_up, bias = experts.gate_up_proj[e].detach(), experts.gate_up_proj_bias[e].detach()
        down, b_down = experts.down_proj[e].detach(), experts.down_proj_bias[e].detach()
        return gate_up[:, ::2].T, bias[::2], gate_up[:, 1::2].T, bias[1::2], down.T, b_down

    @torch.no_grad()
    def factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Frozen:
        experts: Any = module.experts
        limit, alpha = float(experts.limit), float(experts.alpha)
        batch, q, d = real.shape
        flat = real.reshape(-1, d)
        weights, chosen = _route(module, flat)
        factors: dict[int, Tensor] = {}
        bias = flat.new_zeros((flat.shape[0], d), dtype=torch.float32)
        for e in torch.unique(chosen).tolist():
            w = (weights * (chosen == e)).sum(-1, keepdim=True).float()
            w_g, b_g, w_u, b_u, down, b_down = (t.float() for t in self._expert(module, int(e)))
            g = (F.linear(flat.float(), w_g) + b_g).clamp(max=limit)
            u = F.linear(flat.float(), w_u) + b_u
            glu = g * torch.sigmoid(alpha * g)
            clamped = u.clamp(-limit, limit)
            kept = (clamped == u).float()  # the clamp's mask: 1 where it leaves u as it is
            factors[int(e)] = (w * kept * glu).view(batch, q, -1).to(dtype)
            constant = glu * (kept * b_u + (1 - kept) * clamped + 1)
            bias += w * (F.linear(constant, down) + b_down)
        return factors, bias.view(batch, q, d).to(dtype)

    def apply(self, module: nn.Module, frozen: Frozen, x: Tensor, t0: int = 0) -> Tensor:
        total: Tensor | None = None
        for e, factor in frozen[0].items():
            _, _, w_u, _, down, _ = self._expert(module, e)
            part = F.linear(scale(F.linear(x, w_u.to(x)), factor, t0), down.to(x))
            total = part if total is None else total + part
        return x * 0 if total is None else total

    def bias(self, module: nn.Module, frozen: Frozen) -> Tensor:
        """The up biases, the clamps' constants and the ``+ 1`` offsets through the frozen gates
        and ``down``, plus ``down``'s biases, each times its routing weight."""
        return frozen[1]

    @torch.no_grad()
    def uniform_factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> MoEUniform:
        """The uniform rule's frozen factors from the real input (see the module's docstring)."""
        experts: Any = module.experts
        limit, alpha = float(experts.limit), float(experts.alpha)

        def chain(z: Tensor) -> Tensor:  # the gate's element-wise chain: clamp, then glu
            z = z.clamp(max=limit)
            return z * torch.sigmoid(alpha * z)

        batch, q, d = real.shape
        flat = real.reshape(-1, d).float()
        weights, chosen = _route(module, real.reshape(-1, d))
        weights = weights.float()
        router: Any = module.router
        logits = F.linear(flat, router.weight.detach().float())  # bias-free: W x, as uniform() maps x
        slopes, reference = routing(logits, weights, chosen, (None, True, None))  # softmax of the top-k
        scattered = torch.zeros_like(logits).scatter(-1, chosen, weights)
        gates: dict[int, tuple[Tensor, Tensor]] = {}
        outputs = flat.new_zeros((*chosen.shape, d))
        bias = flat.new_zeros((flat.shape[0], d))
        for e in torch.unique(chosen).tolist():
            w = 0.5 * scattered[:, e : e + 1]  # the expert's half of w x E
            w_g, b_g, w_u, b_u, down, b_down = (t.float() for t in self._expert(module, int(e)))
            g, u = F.linear(flat, w_g) + b_g, F.linear(flat, w_u) + b_u
            glu, clamped = chain(g), u.clamp(-limit, limit)
            kept = (clamped == u).float()
            ratio = identity_ratio(chain, g)
            through_gate, through_up = 0.5 * (clamped + 1) * ratio, 0.5 * glu * kept
            gates[int(e)] = tuple((w * f).view(batch, q, -1).to(dtype) for f in (through_gate, through_up))  # type: ignore[assignment]
            constant = through_up * b_u + 0.5 * glu * ((1 - kept) * clamped + 1) + through_gate * b_g
            bias += w * (F.linear(constant, down) + b_down)
            output = F.linear((clamped + 1) * glu, down) + b_down
            outputs += (chosen == e).unsqueeze(-1) * output.unsqueeze(1)
        route = (logits, weights, chosen, slopes, reference)
        return MoEUniform.of(gates, route, outputs, (batch, q), dtype, bias=bias)

    def uniform(self, module: nn.Module, factors: MoEUniform, x: Tensor, t0: int = 0) -> Tensor:
        """Through each expert's gate and up (the routing weight's half) and through the router."""
        router: Any = module.router
        total = through_router(router.weight.detach(), factors, x, t0)
        for e, (through_gate, through_up) in factors.gates.items():
            w_g, _, w_u, _, down, _ = self._expert(module, e)
            inner = scale(F.linear(x, w_g.to(x)), through_gate, t0) + scale(
                F.linear(x, w_u.to(x)), through_up, t0
            )
            total = total + F.linear(inner, down.to(x))
        return total

    def uniform_bias(self, module: nn.Module, factors: MoEUniform) -> Tensor | None:
        """The biases through their frozen factors, the clamps' constants and the offsets."""
        return factors.bias

    def uniform_unassigned(self, module: nn.Module, factors: MoEUniform) -> Tensor:
        """What the router's softmax, linearised at the real logits, gives no input (its bias's
        part included)."""
        return factors.missing

    def width(self, module: nn.Module) -> int:
        experts: Any = module.experts
        return int(experts.gate_up_proj.shape[-1])

    def returns_router_logits(self, module: nn.Module) -> bool:
        return True  # (hidden states, router scores), in every transformers version
