"""The one place that knows about differences between transformers versions."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn

TRANSFORMERS_VERSION = Version(transformers.__version__)
SUPPORTED_RANGE = ">=4.57,<5.40"

# Whether every attention passes its ``scaling`` to the attention function (4.x GPT-2 does
# not: its eager function applies scale_attn_by_inverse_layer_idx itself, SDPA ignores it).
ATTENTION_SCALING_PASSED = Version("5.0") <= TRANSFORMERS_VERSION

# transformers renamed the cache keyword from ``past_key_values`` to ``cache`` in 5.24
# (the old name is still accepted, with a FutureWarning, until 5.40).
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(model: Any) -> str:
    """The keyword a model's forward takes its cache under (``cache`` from 5.24 on)."""
    forward = getattr(model.forward, "__wrapped__", model.forward)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def find_cache(kwargs: dict[str, Any], keywords: tuple[str, ...] = CACHE_KEYWORDS) -> Any:
    """The cache object passed under any of its names, or None."""
    for key in keywords:
        value = kwargs.get(key)
        if value is not None:
            return value
    return None


def cache_length(cache: Any, layer_idx: int = 0) -> int:
    """Number of positions a transformers cache already holds for one layer."""
    if cache is None:
        return 0
    if getattr(cache, "has_previous_state", None) is False:
        # 4.x's hybrid Mamba cache before its first call: its attention layers' empty key
        # caches are [batch, 0], whose length it reports as the batch size
        return 0
    return int(cache.get_seq_length(layer_idx))


def uses_attention_interface(attention: Any) -> bool:
    """Whether an attention module's stock code dispatches through transformers' attention
    registry (every family in 5.x; in 4.x some, Qwen2-MoE among them, still compute it inline)."""
    return hasattr(sys.modules.get(type(attention).__module__), "ALL_ATTENTION_FUNCTIONS")


# A module's name in 4.x where 5.x renamed it: Mixtral's ``block_sparse_moe``, GPT-NeoX's
# ``embed_out`` (the LM head).
RENAMED = {"mlp": "block_sparse_moe", "lm_head": "embed_out"}


def attribute(owner: Any, attr: str) -> Any:
    """``owner``'s module ``attr``, under either version's name; None if absent."""
    module = getattr(owner, attr, None)
    if module is None and attr in RENAMED:
        module = getattr(owner, RENAMED[attr], None)
    return module


def drop_cache(out: Any) -> None:
    """Set a generate output's cache to None under whichever name it has."""
    for key in CACHE_KEYWORDS:
        if key in out.keys():  # noqa: SIM118 (`key in out`, like out.get, warns for the old name on 5.x)
            out[key] = None


# -- sparse mixture-of-experts blocks -----------------------------------------------------
# 4.x writes the routing inside the block (``gate`` an nn.Linear, ``experts`` an nn.ModuleList
# of MLPs) and returns ``(hidden states, router logits)``; 5.x has a router module returning
# ``(logits, weights, experts)``, the experts fused into 3-D ``gate_up_proj`` / ``down_proj``,
# and returns the hidden states alone.


def moe_gate(block: Any) -> Any:
    """A block's router: ``gate`` (most families), or ``router`` (Granite 4.0's hybrids)."""
    gate = getattr(block, "gate", None)
    return block.router if gate is None else gate


def moe_route(block: Any, real: Tensor) -> tuple[Tensor, Tensor]:
    """The stock router's choice for ``real [N, hidden]``: ``(weights [N, k], experts [N, k])``."""
    gate = moe_gate(block)
    if isinstance(gate, nn.Linear):
        probs = torch.softmax(gate(real).float(), dim=-1)
        weights, chosen = torch.topk(probs, int(block.top_k), dim=-1)
        if getattr(block, "norm_topk_prob", True):  # Mixtral always renormalises
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(real.dtype), chosen
    out = gate(real)
    if len(out) == 2:  # DeepSeek-V3 in 4.x: (experts, weights)
        chosen, weights = out
        return weights, chosen
    if len(out) == 5:  # Granite 4.0's hybrid in 4.x: the chosen pairs sorted by expert
        order, _, gates, sizes, logits = out
        k = order.numel() // logits.shape[0]
        flat_weights = gates.new_zeros(order.numel()).index_copy(0, order, gates)
        experts = torch.repeat_interleave(torch.arange(len(sizes), device=order.device), torch.tensor(sizes))
        flat_chosen = torch.zeros_like(order).index_copy(0, order, experts.to(order.device))
        return flat_weights.view(-1, k), flat_chosen.view(-1, k)
    _, weights, chosen = out
    return weights, chosen


def moe_router(block: Any) -> tuple[Tensor, bool, float | None]:
    """The router's weight ``[experts, hidden]``; whether the chosen experts' weights are
    renormalised to sum to 1 (a softmax over the chosen logits, else a softmax over all; or,
    for sigmoid scores, divided by their sum); and for sigmoid scores (DeepSeek-V3) the factor
    the weights are scaled by (None: a softmax router)."""
    gate = moe_gate(block)
    normalised = getattr(block, "norm_topk_prob", None) if isinstance(gate, nn.Linear) else None
    normalised = getattr(gate, "norm_topk_prob", True) if normalised is None else normalised
    sigmoid = getattr(gate, "routed_scaling_factor", None)  # DeepSeek-V3's sigmoid scores
    weight = gate.layer.weight if hasattr(gate, "layer") else gate.weight  # Granite 4.0 in 4.x: .layer
    return weight.detach(), bool(normalised), None if sigmoid is None else float(sigmoid)


def moe_experts(block: Any, names: tuple[str, str, str]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each expert's ``(gate, up, down)`` weights; ``names``: the 4.x expert MLP's attributes."""
    experts = getattr(block, "experts", None)
    if experts is None:  # Granite 4.0's hybrid in 4.x: input_linear / output_linear [E, out, in]
        gate_up, down = block.input_linear.weight.detach(), block.output_linear.weight.detach()
        half = gate_up.shape[1] // 2
        return [(gate_up[e, :half], gate_up[e, half:], down[e]) for e in range(gate_up.shape[0])]
    if isinstance(experts, nn.ModuleList):
        mlps: list[Any] = list(experts)
        return [tuple(getattr(e, n).weight.detach() for n in names) for e in mlps]  # type: ignore[misc]
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    half = gate_up.shape[1] // 2
    return [(gate_up[e, :half], gate_up[e, half:], down[e]) for e in range(gate_up.shape[0])]


def moe_activation(block: Any) -> Any:
    experts = getattr(block, "experts", None)
    if experts is None:  # Granite 4.0's hybrid in 4.x
        return block.activation
    return experts[0].act_fn if isinstance(experts, nn.ModuleList) else experts.act_fn


def moe_returns_router_logits(block: Any) -> bool:
    """Whether the block returns ``(hidden states, router logits)`` (4.x)."""
    experts = getattr(block, "experts", None)
    return isinstance(experts, nn.ModuleList) or (experts is None and hasattr(block, "input_linear"))


def mamba_mask(mask: Tensor | None) -> Tensor | None:
    """The padding mask a Mamba-2 layer applies to its input: 4.x applies it only to a batch
    of several rows over several positions; 5.x whenever it is given."""
    if mask is None or TRANSFORMERS_VERSION.major >= 5:
        return mask
    return mask if mask.shape[0] > 1 and mask.shape[1] > 1 else None
