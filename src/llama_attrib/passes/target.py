"""Target mode: one decoder layer (or the final norm) at a time, as a differentiable pass
whose frozen factors come from the real hidden state it is given (:mod:`llama_attrib.sweep`).
Every bias enters as a leaf, so the backward gives its share; so does what a quantized layer's
kernel rounds (:mod:`llama_attrib.quantized`), in its own share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .. import _compat, rules
from ..families import model_dtype
from .base import Args, Kwargs, Pass, argument, replace_hidden, stock_attention


class TargetPass(Pass):
    """The layers' maps on target mode's one differentiable tensor ``[batch, q, hidden]``.

    ``keep_from``: the first explained position (the last layer's outputs before it reach no
    explained logit, so they get no graph); ``probabilities``: ``(bytes computed at a time,
    bytes kept for the backward)`` of attention probabilities, where a memory budget needs
    them smaller than the defaults. Collects every bias as a leaf (``bias_leaves``), and what
    quantized kernels round (``rounding_leaves``)."""

    def __init__(
        self, dtype: torch.dtype, keep_from: int = 0, probabilities: tuple[int, int] | None = None
    ) -> None:
        super().__init__(dtype)
        self.keep_from = keep_from
        self.probabilities = probabilities
        self.bias_leaves: list[Tensor] = []
        self.rounding_leaves: list[Tensor] = []

    def bias_leaf(self, bias: Tensor) -> Tensor:
        """A bias as a leaf of the pass, so the backward gives its share."""
        return _leaf(bias, self.bias_leaves)

    def rounding_leaf(self, difference: Tensor) -> Tensor:
        """What a quantized kernel rounds, as a leaf of the pass (the rounding share)."""
        return _leaf(difference, self.rounding_leaves)

    def rounding(self) -> rules.linear.Rounding:
        """The account quantized layers add what they round to, while the pass runs."""
        return rules.linear.Rounding(self.session.model_dtype, self.rounding_leaf)

    def _keep(self, module: nn.Module) -> int:
        return self.keep_from if id(module) in self.session.last_layer else 0

    def norm(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        rule = self.session.family.norm
        x = args[0]
        out = rule.apply(rule.factor(module, x.detach(), x.dtype), x)
        bias = rule.bias(module)
        return out if bias is None else out + self.bias_leaf(bias.to(out).expand_as(out))

    def attention(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        family = self.session.family
        x = argument(args, kwargs, "hidden_states", 0)
        real = model_dtype(module, self.session.model_dtype)
        args, kwargs = replace_hidden(args, kwargs, x.detach().to(real))
        with torch.no_grad():
            # the real mix of the values is the forward's value of the frozen one (no
            # probabilities computed), unless they are small enough to keep for the backward
            # or the model computes in another dtype than the components
            _, scores = stock_attention(module, original, args, kwargs, skip=self.dtype != real)
        if self.probabilities is not None:
            block, kept = self.probabilities
            scores = replace(scores, block=block, keep=kept)
        head_dim = family.head_dim(module)
        graph = rules.attention_graph(
            family.attention, module, head_dim, scores, x, self.bias_leaf, self._keep(module)
        )
        return graph, None

    def mlp(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        rule: Any = self.session.family.mlp_rule(module)
        x = args[0]
        real = model_dtype(module, self.session.model_dtype)
        gate = rule.factors(module, x.detach().to(real), x.dtype)
        out = split_at(self._keep(module), x, lambda part, t0: rule.apply(module, gate, part, t0))
        bias = rule.bias(module, gate)
        out = out if bias is None else out + self.bias_leaf(bias.to(out))
        if _compat.moe_returns_router_logits(module):
            return out, None
        return out


def _leaf(value: Tensor, leaves: list[Tensor]) -> Tensor:
    """``value`` as a new leaf that requires grad (a constant without a graph)."""
    if not torch.is_grad_enabled():
        return value.detach()
    leaf = value.detach().clone().requires_grad_(True)
    leaves.append(leaf)
    return leaf


def split_at(keep: int, x: Tensor, apply: Callable[[Tensor, int], Tensor]) -> Tensor:
    """A position-wise rule in pieces of :data:`rules.mlp.ROWS` positions; with ``keep``, a
    graph only from that position (the positions before it get none)."""
    q = x.shape[1]
    keep = keep if 0 < keep < q else 0
    parts = []
    if keep:
        with torch.no_grad():
            parts.append(apply(x[:, :keep].detach(), 0))
    # split, not slices: the backward joins the pieces' gradients once, where each slice's
    # would be a zero-filled whole-length tensor (per target) added to the others
    pieces = (x[:, keep:] if keep else x).split(rules.mlp.ROWS, dim=1)
    parts.extend(apply(piece, keep + i * rules.mlp.ROWS) for i, piece in enumerate(pieces))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
