"""Forward mode: every leaf module carries the components beside the real hidden state
(:class:`llama_attrib.stream.DecomposedTensor`), through the stock layers' own code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import _compat, rules
from ..errors import DecompositionError, UnsupportedOptionError
from ..stream import DecomposedTensor, split
from .base import Args, Kwargs, Pass, hidden_states, replace_hidden, stock_attention


@dataclass
class FlowRecord:
    """One position: each block's output there, before it joins the residual stream
    (attention: every head's mixed values before the output projection), and the norms'
    frozen factors there. Keyed by ``id(module)``; values ``(components, bias share)``."""

    position: int
    attention: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    mlp: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    norm: dict[int, Tensor] = field(default_factory=dict)

    def recorder(self, module: nn.Module) -> tuple[int, Callable[[Tensor, Tensor | None], None]]:
        """``(position, record)`` for :func:`rules.attention`."""

        def record(comps: Tensor, residual: Tensor | None) -> None:
            self.attention[id(module)] = (comps, residual)

        return self.position, record


class ForwardPass(Pass):
    """Components beside the real hidden state, from the embedding to the LM head.

    ``offset``: positions already in the cache; ``layout``: which positions each component
    holds (a finished sequence, or chunks of it); ``flow``: what each block adds at one
    position, recorded for :func:`llama_attrib.flow`. Collects the LM head's input
    (``head``: real, components, bias share) and its logits."""

    def __init__(
        self,
        dtype: torch.dtype,
        offset: int = 0,
        layout: rules.Layout | None = None,
        flow: FlowRecord | None = None,
        expected_length: int = 0,
    ) -> None:
        super().__init__(dtype)
        self.offset = offset
        self.layout = layout
        self.flow = flow
        self.expected_length = expected_length  # a generation's final length, to size caches
        self.head: tuple[Tensor, Tensor, Tensor | None] | None = None

    def begin(self, session: Any) -> None:
        super().begin(session)
        if self.offset == 0:
            session.caches.clear()

    def failed(self) -> None:
        self.session.caches.clear()  # they may be half written

    def embedding(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        out = original(*args, **kwargs)
        return DecomposedTensor.wrap(out, rules.embedding(out, self.offset, self.dtype, self.layout))

    def norm(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        rule = self.session.family.norm
        real, comps, residual = split(args[0])
        factor = rule.factor(module, real, comps.dtype)
        if self.flow is not None:
            self.flow.norm[id(module)] = factor[:, self.flow.position].clone()
        res = None if residual is None else rule.apply(factor, residual)
        bias = rule.bias(module)
        if bias is not None:
            res = bias.to(comps).expand(real.shape) + (0 if res is None else res)
        stock = original(real, *args[1:], **kwargs)
        return DecomposedTensor.wrap(stock, rule.apply(factor, comps), res)

    def attention(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        family = self.session.family
        real, comps, residual = split(hidden_states(args, kwargs))
        args, kwargs = replace_hidden(args, kwargs, real)
        found = _compat.find_cache(kwargs, family.cache_keywords())
        layer_idx = int(module.layer_idx)  # type: ignore[arg-type]
        cache = self.session.caches.of(layer_idx, found, self.offset, self.expected_length)
        (out, weights), scores = stock_attention(module, original, args, kwargs, skip=False)
        record = None if self.flow is None else self.flow.recorder(module)
        head_dim = family.head_dim(module)
        rule = family.attention.bound(module, real)
        comps_out, res = rules.attention(
            rule, module, head_dim, scores.rows(), comps, residual, cache, self.offset, self.layout, record,
        )  # fmt: skip
        return DecomposedTensor.wrap(out, comps_out, res), weights

    def mixer(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        """A state-space layer (:mod:`..rules.mamba`), step by step as the stock layer runs from
        its cache: its past lives in the session's caches, beside the attention's values."""
        if self.flow is not None:
            raise UnsupportedOptionError(
                f"flow() splits attention heads and MLPs; {type(module).__name__} is neither: use "
                "llama_attrib.decompose_sequence for this model"
            )
        real, comps, residual = split(hidden_states(args, kwargs))
        args, kwargs = replace_hidden(args, kwargs, real)
        stock = original(*args, **kwargs)
        states = self.session.caches.states
        past = states.get(id(module)) if self.offset else None
        if self.offset and (past is None or past.length != self.offset):
            raise DecompositionError(
                f"{type(module).__name__}: the cache holds {self.offset} positions that this model's "
                "decomposed calls did not see; decompose from an empty cache (or none)"
            )
        comps_out, res, states[id(module)] = rules.mamba.forward_step(
            module, past, real, kwargs.get("attention_mask"), comps, residual
        )
        return DecomposedTensor.wrap(stock, comps_out, res)

    def mlp(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        rule: Any = self.session.family.mlp_rule(module)  # GatedMLP, MLP or SparseMoE: one interface
        real, comps, residual = split(args[0])
        stock = original(real, *args[1:], **kwargs)
        gate = rule.factors(module, real, comps.dtype)
        comps_out = rules.positionwise(
            lambda part, t0: rule.apply(module, gate, part, t0),
            comps,
            self.offset,
            rule.width(module),
            self.layout,
        )
        res = None if residual is None else rule.apply(module, gate, residual)
        bias = rule.bias(module, gate)
        if bias is not None:
            res = bias if res is None else res + bias
        if self.flow is not None:
            t = self.flow.position
            # copies: a view would keep the whole [C, B, q, hidden] output alive
            self.flow.mlp[id(module)] = (
                comps_out[:, :, t].clone(),
                None if res is None else res[:, t].clone(),
            )
        if rule.returns_router_logits(module):  # (hidden, router logits or scores)
            return (DecomposedTensor.wrap(stock[0], comps_out, res), *stock[1:])
        return DecomposedTensor.wrap(stock, comps_out, res)

    def lm_head(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        real, comps, residual = split(args[0])
        out = original(real, *args[1:], **kwargs)
        self.keep_logits(out)
        self.head = (real, comps, residual)
        return out
