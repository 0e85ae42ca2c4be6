"""Mixtral: sparse mixture of experts. The router's weights are frozen factors; the chosen
experts are SwiGLU MLPs (gate frozen, up and down linear)."""

from typing import Any

import torch
from torch import Tensor, nn

from .. import rules
from . import register_family, standard


def _route(block: Any, real: Tensor) -> tuple[Tensor, Tensor]:
    """The stock router's choice: ``(weights [N, k], experts [N, k])``."""
    gate = block.gate
    if isinstance(gate, nn.Linear):  # transformers 4.x: the routing is written in the block
        probs = torch.softmax(gate(real).float(), dim=-1)
        weights, chosen = torch.topk(probs, int(block.top_k), dim=-1)
        return (weights / weights.sum(-1, keepdim=True)).to(real.dtype), chosen
    _, weights, chosen = gate(real)  # transformers 5.x: a router module
    return weights, chosen


def _experts(block: Any) -> list[rules.Expert]:
    experts = block.experts
    if isinstance(experts, nn.ModuleList):  # transformers 4.x: one module per expert
        mlps: list[Any] = list(experts)
        return [(e.w1.weight.detach(), e.w3.weight.detach(), e.w2.weight.detach()) for e in mlps]
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    half = gate_up.shape[1] // 2
    return [(gate_up[e, :half], gate_up[e, half:], down[e]) for e in range(gate_up.shape[0])]


def _act(block: Any) -> Any:
    experts = block.experts
    return experts[0].act_fn if isinstance(experts, nn.ModuleList) else experts.act_fn


MIXTRAL = register_family(
    standard(
        "Mixtral",
        classes={"mlp": ("MixtralSparseMoeBlock",)},
        layer_roles={
            "input_layernorm": "norm",
            "self_attn": "attention",
            "post_attention_layernorm": "norm",
            "mlp": "mlp",
        },
        mlp=rules.SparseMoE(
            route=_route,
            experts=_experts,
            act=_act,
            # transformers 4.x: the block returns (hidden states, router logits)
            returns_router_logits=lambda block: isinstance(block.experts, nn.ModuleList),
        ),
        inner=("MixtralTopKRouter", "MixtralExperts", "MixtralBlockSparseTop2MLP", "ModuleList"),
        notes="sparse MoE: router weights frozen, each chosen expert a SwiGLU (gate frozen)",
    )
)
