"""The MLPs: gated (SwiGLU), without a gate (GPT-2, GPT-NeoX), and sparse mixtures of experts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _compat
from .linear import Proj, scale

# Target mode applies a position-wise rule (the MLP) to this many positions at a time: the
# backward then holds the ``[targets, positions, intermediate]`` temporaries of one piece.
ROWS = 1024


class _ScaledMLP:
    """The linear part of an MLP whose nonlinearity is a frozen factor: ``down(factor * up(x))``."""

    up: Proj
    down: Proj

    def apply(self, module: nn.Module, factor: Tensor, x: Tensor, t0: int = 0) -> Tensor:
        return self.down.linear(module, scale(self.up.linear(module, x), factor, t0))

    def bias(self, module: nn.Module, factor: Tensor) -> Tensor | None:
        """The output's bias share ``down(factor * b_up) + b_down`` (None without biases)."""
        b_up, b_down = self.up.bias(module), self.down.bias(module)
        if b_up is None and b_down is None:
            return None
        out = factor.new_zeros((*factor.shape[:-1], self.down.weight(module).shape[0]))
        if b_up is not None:
            out = out + self.down.linear(module, factor * b_up.to(factor))
        return out if b_down is None else out + b_down.to(out)

    def width(self, module: nn.Module) -> int:
        return 2 * int(self.up.weight(module).shape[0])


def identity_ratio(act: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """``act(z) / z`` in float32 (the identity rule's factor), at ``z = 0`` its limit, the
    activation's slope there (a centred difference)."""
    z = z.to(torch.float32)
    tiny = torch.full_like(z, 1e-4)
    slope = (act(tiny) - act(-tiny)) / (2 * tiny)
    return torch.where(z == 0, slope, act(z) / torch.where(z == 0, tiny, z))


Uniform = tuple[Tensor, Tensor]  # the gate's and up's factors under the uniform rule [B, q, intermediate]


@dataclass(frozen=True)
class GatedMLP(_ScaledMLP):
    """``down(act(gate(x)) * up(x))``. Exact rules: the gate ``act(gate(x))`` frozen. The
    uniform rule (:meth:`uniform`): half through ``up`` (the gate frozen), half through the
    gate (``up`` frozen, the activation by the identity rule)."""

    gate: Proj
    up: Proj
    down: Proj
    act: str  # the module's attribute that is its activation

    @torch.no_grad()
    def factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Tensor:
        act: Callable[[Tensor], Tensor] = getattr(module, self.act)
        return act(self.gate.affine(module, real)).to(dtype)

    @torch.no_grad()
    def uniform_factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Uniform:
        """The uniform rule's frozen factors, from the real input: ``up * act(gate) / gate / 2``
        (what the gate's linear map is multiplied by) and ``act(gate) / 2`` (up's)."""
        act: Callable[[Tensor], Tensor] = getattr(module, self.act)
        z = self.gate.affine(module, real)
        up = self.up.affine(module, real).to(torch.float32)
        through_gate = 0.5 * identity_ratio(act, z) * up
        return through_gate.to(dtype), (0.5 * act(z).to(torch.float32)).to(dtype)

    def uniform(self, module: nn.Module, factors: Uniform, x: Tensor, t0: int = 0) -> Tensor:
        """``down(gate(x) * up * act(gate) / gate / 2 + up(x) * act(gate) / 2)`` (bias-free maps):
        half of the product through each side, the activation by the identity rule."""
        through_gate, through_up = factors
        inner = scale(self.gate.linear(module, x), through_gate, t0)
        return self.down.linear(module, inner + scale(self.up.linear(module, x), through_up, t0))

    def uniform_bias(self, module: nn.Module, factors: Uniform) -> Tensor | None:
        """The uniform rule's bias share: the gate's and up's biases through their halves, and
        down's."""
        through_gate, through_up = factors
        b_gate, b_up, b_down = self.gate.bias(module), self.up.bias(module), self.down.bias(module)
        if b_gate is None and b_up is None and b_down is None:
            return None
        out = through_gate.new_zeros((*through_gate.shape[:-1], self.down.weight(module).shape[0]))
        if b_gate is not None or b_up is not None:
            inner = through_gate.new_zeros(through_gate.shape)
            inner = inner if b_gate is None else inner + through_gate * b_gate.to(inner)
            inner = inner if b_up is None else inner + through_up * b_up.to(inner)
            out = out + self.down.linear(module, inner)
        return out if b_down is None else out + b_down.to(out)


@dataclass(frozen=True)
class MLP(_ScaledMLP):
    """``down(act(up(x)))`` without a gate (GPT-2, GPT-NeoX): ``act(z)`` is ``z * (act(z) / z)``
    with the ratio frozen (for the GELU, exactly ``Phi(z)``); ``up``'s bias reaches the output
    through the frozen ratio, as the bias share."""

    up: Proj
    down: Proj
    act: str  # the module's attribute that is its activation

    @torch.no_grad()
    def factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Tensor:
        act: Callable[[Tensor], Tensor] = getattr(module, self.act)
        return identity_ratio(act, self.up.affine(module, real)).to(dtype)


Expert = tuple[Tensor, Tensor, Tensor]  # one expert's gate, up and down weights
SHARED = -1  # the key of a shared expert's factor (Qwen2-MoE), beside the routed experts'


@dataclass(frozen=True)
class SparseMoE:
    """``sum_e w_e * down_e(act(gate_e(x)) * up_e(x))`` over the experts the router chose,
    plus, where the block has one, a shared expert ``sigmoid(g(x)) * down(act(gate(x)) * up(x))``.

    The routing weights ``w_e`` (zero for an expert not chosen at a position), the shared
    expert's sigmoid gate and each expert's ``act(gate(x))`` are frozen factors. The block is
    read through :mod:`llama_attrib._compat` (its layout differs between transformers versions);
    ``expert_names``: a 4.x expert MLP's gate, up and down attributes; ``shared`` /
    ``shared_gate``: the shared expert MLP's and its gate's attributes, if any, and
    ``shared_rule`` the shared expert's own rule.
    """

    expert_names: tuple[str, str, str]
    shared: str | None = None
    shared_gate: str | None = None
    shared_rule: GatedMLP | None = None

    def experts(self, module: nn.Module) -> list[Expert]:
        return _compat.moe_experts(module, self.expert_names)

    def _shared(self, module: nn.Module) -> tuple[nn.Module, GatedMLP] | None:
        if self.shared is None or self.shared_rule is None:
            return None
        return module.get_submodule(self.shared), self.shared_rule

    @torch.no_grad()
    def factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> dict[int, Tensor]:
        """Per expert used anywhere: ``w_e * act(gate_e(real))``, ``[B, q, intermediate]``."""
        batch, q, d = real.shape
        weights, chosen = _compat.moe_route(module, real.reshape(-1, d))
        act = _compat.moe_activation(module)
        out = {}
        for e, (gate, _, _) in enumerate(self.experts(module)):
            w = (weights * (chosen == e)).sum(-1).view(batch, q, 1)
            if bool((w != 0).any()):
                out[e] = (act(F.linear(real, gate.to(real))) * w.to(real)).to(dtype)
        if (shared := self._shared(module)) is not None:
            mlp, rule = shared
            gate = torch.sigmoid(Proj(str(self.shared_gate)).affine(module, real))
            out[SHARED] = (rule.factors(mlp, real, dtype) * gate.to(dtype)).to(dtype)
        return out

    def apply(self, module: nn.Module, gates: dict[int, Tensor], x: Tensor, t0: int = 0) -> Tensor:
        experts = self.experts(module)
        total: Tensor | None = None
        for e, gate in gates.items():
            if e == SHARED:
                mlp, rule = self._shared(module)  # type: ignore[misc]
                part = rule.apply(mlp, gate, x, t0)
            else:
                _, up, down = experts[e]
                part = F.linear(scale(F.linear(x, up.to(x)), gate, t0), down.to(x))
            total = part if total is None else total + part
        return x * 0 if total is None else total

    def bias(self, module: nn.Module, gates: dict[int, Tensor]) -> Tensor | None:
        return None

    def width(self, module: nn.Module) -> int:
        return 2 * int(self.experts(module)[0][1].shape[0])

    def returns_router_logits(self, module: nn.Module) -> bool:
        return _compat.moe_returns_router_logits(module)
