"""The MLPs: gated (SwiGLU), without a gate (GPT-2, GPT-NeoX), and sparse mixtures of experts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

    def returns_router_logits(self, module: nn.Module) -> bool:
        return False  # a dense MLP returns its output alone


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


def _half_of(attr: str, index: int) -> Callable[[nn.Module], slice]:
    def rows(mlp: nn.Module) -> slice:
        fused: Any = mlp.get_submodule(attr)
        half = int(fused.out_features) // 2
        return slice(0, half) if index == 0 else slice(half, None)

    return rows


def fused_gated_mlp(fused: str, down: str, act: str) -> GatedMLP:
    """A gated MLP whose gate and up maps are the two halves of one fused projection's rows
    (gate first: Phi-3's ``gate_up_proj``, Granite 4.0's shared ``input_linear``)."""
    return GatedMLP(Proj(fused, _half_of(fused, 0)), Proj(fused, _half_of(fused, 1)), Proj(down), act)


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


@dataclass(frozen=True)
class MoEUniform:
    """:meth:`SparseMoE.uniform_factors`: ``gates`` per used expert; per position the routing
    ``weights``, ``chosen`` experts, ``slopes`` and ``reference`` ``[B, q, k]`` / ``[B, q, E]``
    (:func:`routing_step`);
    half the chosen experts' real ``outputs`` ``[B, q, k, hidden]``; the shared expert's
    ``(its halves, the sigmoid's slope, half its real output)``; the ``missing`` part."""

    gates: dict[int, Uniform]
    weights: Tensor
    chosen: Tensor
    slopes: Tensor
    reference: Tensor
    outputs: Tensor
    shared: tuple[Uniform, Tensor | None, Tensor | None] | None
    missing: Tensor
    bias: Tensor | None = None  # the bias share, where the experts have biases (GPT-OSS)

    @staticmethod
    def of(
        gates: dict[int, Uniform],
        routing: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
        outputs: Tensor,
        shape: tuple[int, int],
        dtype: torch.dtype,
        shared: tuple[Uniform, Tensor | None, Tensor | None] | None = None,
        missing: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> MoEUniform:
        """From the flat ``[N, ...]`` float32 factors: ``routing`` the real ``(logits, weights,
        chosen, slopes, reference)``, ``outputs`` the chosen experts' real outputs ``[N, k,
        hidden]``; what the routing's linearisation at the real logits misses is added to
        ``missing`` (another part's, such as a shared expert's gate)."""
        logits, weights, chosen, slopes, reference = routing
        halves = 0.5 * outputs
        linear = routing_step(logits, weights, chosen, slopes, reference)  # J (W x) at the real x
        lost = ((weights - linear).unsqueeze(-1) * halves).sum(1)
        lost = lost if missing is None else lost + missing
        batch, q = shape
        return MoEUniform(
            gates=gates,
            weights=weights.view(batch, q, -1).to(dtype),
            chosen=chosen.view(batch, q, -1),
            slopes=slopes.view(batch, q, -1).to(dtype),
            reference=reference.view(batch, q, -1).to(dtype),
            outputs=halves.view(batch, q, *halves.shape[1:]).to(dtype),
            shared=shared,
            missing=lost.view(batch, q, -1).to(dtype),
            bias=None if bias is None else bias.view(batch, q, -1).to(dtype),
        )


def through_router(router: Tensor, factors: MoEUniform, x: Tensor, t0: int = 0) -> Tensor:
    """The router's half: ``sum_k (J_k W x) E_k / 2`` (``router``: its weight ``W``, the
    chosen experts' halved real outputs ``E_k`` in ``factors``)."""
    t1 = t0 + x.shape[-2]
    step = routing_step(
        F.linear(x, router.to(x)),
        factors.weights[:, t0:t1],
        factors.chosen[:, t0:t1],
        factors.slopes[:, t0:t1],
        factors.reference[:, t0:t1],
    )
    return (step.unsqueeze(-1) * factors.outputs[:, t0:t1]).sum(-2)


def routing_step(
    logits: Tensor, weights: Tensor, chosen: Tensor, slopes: Tensor, reference: Tensor
) -> Tensor:
    """The chosen experts' routing weights' Jacobian at the real logits times ``logits`` (a
    linear map's output ``W x``): ``w_k (a_k z_k - sum_j r_j z_j)``. A softmax: ``a = 1`` and
    ``r`` the chosen weights (a softmax over the chosen logits) or every expert's probability;
    sigmoid scores ``s`` (DeepSeek-V3): ``a = 1 - s`` and, renormalised, ``r_j = (1 - s_j) s_j /
    sum(s)`` over the chosen (else 0)."""
    mean = (logits * reference).sum(-1, keepdim=True)
    return weights * (slopes * logits.gather(-1, chosen) - mean)


def routing(
    logits: Tensor, weights: Tensor, chosen: Tensor, router: tuple[Any, ...]
) -> tuple[Tensor, Tensor]:
    """:func:`routing_step`'s ``(slopes [N, k], reference [N, E])`` at the real ``logits``."""
    _, normalised, sigmoid = router
    if sigmoid is None:
        scattered = torch.zeros_like(logits).scatter(-1, chosen, weights)
        return torch.ones_like(weights), scattered if normalised else torch.softmax(logits, -1)
    slopes = 1 - torch.sigmoid(logits).gather(-1, chosen)
    if not normalised:
        return slopes, torch.zeros_like(logits)
    return slopes, torch.zeros_like(logits).scatter(-1, chosen, slopes * weights / sigmoid)


SHARED = -1  # the key of a shared expert's factor (Qwen2-MoE), beside the routed experts'


@dataclass(frozen=True)
class SparseMoE:
    """``sum_e w_e * down_e(act(gate_e(x)) * up_e(x))`` over the experts the router chose,
    plus, where the block has one, a shared expert ``sigmoid(g(x)) * down(act(gate(x)) * up(x))``
    (Qwen2-MoE) or one without a gate (DeepSeek-V3).

    The routing weights ``w_e`` (zero for an expert not chosen at a position), the shared
    expert's sigmoid gate and each expert's ``act(gate(x))`` are frozen factors. The block is
    read through :mod:`llama_attrib._compat` (its layout differs between transformers versions);
    ``expert_names``: a 4.x expert MLP's gate, up and down attributes; ``shared`` /
    ``shared_gate``: the shared expert MLP's and its gate's attributes, if any, and
    ``shared_rule`` the shared expert's own rule; ``router_logits``: whether the 4.x block
    returns ``(hidden states, router logits)`` (Mixtral's and Qwen's; DeepSeek-V3's does not).
    """

    expert_names: tuple[str, str, str]
    shared: str | None = None
    shared_gate: str | None = None
    shared_rule: GatedMLP | None = None
    router_logits: bool = True

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
            out[SHARED] = rule.factors(mlp, real, dtype)
            if self.shared_gate is not None:
                gate = torch.sigmoid(Proj(self.shared_gate).affine(module, real))
                out[SHARED] = (out[SHARED] * gate.to(dtype)).to(dtype)
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

    # -- the uniform rule (AttnLRP): each product of two token-dependent factors half to each --
    @torch.no_grad()
    def uniform_factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> MoEUniform:
        """From the real input: each used expert's :meth:`GatedMLP.uniform_factors` times half
        its routing weight; the router's half (:meth:`uniform`'s second sum): the routing
        weights, the chosen experts, what the softmax's Jacobian subtracts (``reference``) and
        half each chosen expert's real output; the shared expert's likewise; and what the
        linearised routing misses (:meth:`uniform_unassigned`)."""
        batch, q, d = real.shape
        flat = real.reshape(-1, d)
        weights, chosen = _compat.moe_route(module, flat)
        weights = weights.float()
        router = _compat.moe_router(module)
        logits = F.linear(flat.float(), router[0].float())
        scattered = torch.zeros_like(logits).scatter(-1, chosen, weights)
        slopes, reference = routing(logits, weights, chosen, router)
        act = _compat.moe_activation(module)
        gates: dict[int, Uniform] = {}
        outputs = flat.new_zeros((*chosen.shape, d), dtype=torch.float32)
        for e, (gate, up, down) in enumerate(self.experts(module)):
            w = scattered[:, e : e + 1]
            if not bool((w != 0).any()):
                continue
            z, u = F.linear(flat, gate.to(flat)), F.linear(flat, up.to(flat))
            through_gate = 0.5 * identity_ratio(act, z) * u.float()
            through_up = 0.5 * act(z).float()
            half = 0.5 * w
            gates[e] = tuple((f * half).view(batch, q, -1).to(dtype) for f in (through_gate, through_up))  # type: ignore[assignment]
            output = F.linear((act(z) * u).float(), down.float())
            outputs += (chosen == e).unsqueeze(-1) * output.unsqueeze(1)
        missing: Tensor | None = None
        shared: tuple[Uniform, Tensor | None, Tensor | None] | None = None
        if (found := self._shared(module)) is not None and self.shared_gate is None:
            shared = (found[1].uniform_factors(found[0], real, dtype), None, None)  # added as it is
        elif found is not None:
            mlp, rule = found
            g = Proj(str(self.shared_gate))
            z = g.affine(module, real).float()
            sig = torch.sigmoid(z)
            through_gate, through_up = rule.uniform_factors(mlp, real, torch.float32)
            output = F.linear(
                (getattr(mlp, rule.act)(rule.gate.affine(mlp, real)) * rule.up.affine(mlp, real)).float(),
                rule.down.weight(mlp).float(),
            )
            slope = sig * (1 - sig)  # the sigmoid's derivative at the real gate
            missing = (0.5 * (sig - slope * g.linear(module, real).float()) * output).reshape(-1, d)
            shared = (
                ((0.5 * sig * through_gate).to(dtype), (0.5 * sig * through_up).to(dtype)),
                slope.to(dtype),
                (0.5 * output).to(dtype),
            )
        route = (logits, weights, chosen, slopes, reference)
        return MoEUniform.of(gates, route, outputs, (batch, q), dtype, shared, missing)

    def uniform(self, module: nn.Module, factors: MoEUniform, x: Tensor, t0: int = 0) -> Tensor:
        """``sum_e (w_e / 2) uniform_e(x) + sum_e (J_e W x) E_e / 2``: through each expert (its
        gate x up by the uniform rule, the routing weight frozen) and through the router (the
        weights differentiated at the real logits, each expert's real output ``E_e`` frozen);
        the shared expert likewise with its sigmoid gate."""
        experts = self.experts(module)
        t1 = t0 + x.shape[-2]
        total: Tensor | None = None
        for e, (through_gate, through_up) in factors.gates.items():
            gate, up, down = experts[e]
            inner = scale(F.linear(x, gate.to(x)), through_gate, t0)
            inner = inner + scale(F.linear(x, up.to(x)), through_up, t0)
            part = F.linear(inner, down.to(x))
            total = part if total is None else total + part
        routed = through_router(_compat.moe_router(module)[0], factors, x, t0)
        total = routed if total is None else total + routed
        if factors.shared is not None:
            mlp, rule = self._shared(module)  # type: ignore[misc]
            halves, slope, output = factors.shared
            total = total + rule.uniform(mlp, halves, x, t0)
            if slope is not None and output is not None:
                gate = Proj(str(self.shared_gate)).linear(module, x)
                total = total + scale(gate, slope, t0) * output[:, t0:t1]
        return total

    def uniform_bias(self, module: nn.Module, factors: MoEUniform) -> Tensor | None:
        return None

    def uniform_unassigned(self, module: nn.Module, factors: MoEUniform) -> Tensor:
        """What the routing's linearisation at the real logits gives no input: ``sum_e (w_e - J_e
        W x) E_e / 2`` (and the shared gate's), a softmax's (a sigmoid's) non-conservation."""
        return factors.missing

    def width(self, module: nn.Module) -> int:
        return 2 * int(self.experts(module)[0][1].shape[0])

    def returns_router_logits(self, module: nn.Module) -> bool:
        return self.router_logits and _compat.moe_returns_router_logits(module)
