"""Target mode: one decoder layer (or the final norm) at a time, as a differentiable pass
whose frozen factors come from the real hidden state it is given (:mod:`llama_attrib.sweep`).
Every bias enters as a leaf, so the backward gives its share; so does what a quantized layer's
kernel rounds (:mod:`llama_attrib.quantized`), in its own share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .. import quantized, rules
from ..errors import UnsupportedOptionError
from ..families import model_dtype
from ..patching import Patch, replace_method, restore_all
from .base import (
    Args,
    Kwargs,
    Pass,
    credited_attention,
    hidden_states,
    replace_hidden,
    stock_attention,
)


class TargetPass(Pass):
    """The layers' maps on target mode's one differentiable tensor ``[batch, q, hidden]``.

    ``keep_from``: the first explained position (the last layer's outputs before it reach no
    explained logit, so they get no graph); ``probabilities``: ``(bytes computed at a time,
    bytes kept for the backward)`` of attention probabilities, where a memory budget needs
    them smaller than the defaults; ``rule_set``: the rule set (:mod:`llama_attrib.rules.sets`).
    Collects every bias as a leaf (``bias_leaves``), what quantized kernels round
    (``rounding_leaves``) and what a rule set's softmax passes to no input (``unassigned_leaves``)."""

    def __init__(
        self,
        dtype: torch.dtype,
        keep_from: int = 0,
        probabilities: tuple[int, int] | None = None,
        rule_set: rules.RuleSet = rules.EXACT,
    ) -> None:
        super().__init__(dtype)
        self.keep_from = keep_from
        self.probabilities = probabilities
        self.rule_set = rule_set
        self.bias_leaves: list[Tensor] = []
        self.rounding_leaves: list[Tensor] = []
        self.unassigned_leaves: list[Tensor] = []

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
        return self.rule_set.attention.target(self, module, original, args, kwargs)

    def credited_attention(
        self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs, rule: rules.sets.Credited
    ) -> Any:
        """The family's own code with a graph: its projections, rope and q/k norms are the
        queries' and keys' maps; the attention function is differentiated by ``rule``."""
        x = hidden_states(args, kwargs)
        unassigned = _leaf(x.new_ones((x.shape[0], 1)), self.unassigned_leaves)
        block = None if self.probabilities is None else self.probabilities[0]
        with self._inner_rules(module):
            return credited_attention(module, original, args, kwargs, (rule, unassigned, block))

    def frozen_attention(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        """The probabilities frozen: the values' mix, from the real hidden state's probabilities."""
        family = self.session.family
        x = hidden_states(args, kwargs)
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
            family.attention.bound(module, x.detach().to(real)),
            module,
            head_dim,
            scores,
            x,
            self.bias_leaf,
            self._keep(module),
        )
        return graph, None

    @contextmanager
    def _inner_rules(self, module: nn.Module) -> Iterator[None]:
        """For the call: the attention's linear maps in the components' dtype with their
        biases as leaves, its q/k norms with their scales frozen (per-instance patches)."""
        patches: list[Patch] = []
        try:
            for name, child in module.named_children():
                make = self._inner_forward(module, name, child)
                if make is not None:
                    patches.append(replace_method(child, "forward", make))
            yield
        finally:
            restore_all(patches)

    def _inner_forward(
        self, owner: nn.Module, name: str, child: nn.Module
    ) -> Callable[[Callable[..., Any]], Callable[[Tensor], Tensor]] | None:
        """What makes the forward of ``owner``'s child ``name`` in the pass from its own (None:
        its own stays)."""
        norm = self.session.family.norm
        if isinstance(child, nn.Linear) or quantized.kind(child) is not None or _is_conv1d(child):
            proj = rules.Proj(name, transposed=_is_conv1d(child) and quantized.kind(child) is None)

            def make_linear(own: Callable[..., Any]) -> Callable[[Tensor], Tensor]:
                inside = False

                def linear(x: Tensor) -> Tensor:
                    nonlocal inside
                    if inside:  # the rule's own call of a quantized layer's kernel (Proj.affine)
                        out: Tensor = own(x)
                        return out
                    inside = True
                    try:
                        y = proj.linear(owner, x)
                    finally:
                        inside = False
                    b = proj.bias(owner)
                    return y if b is None else y + self.bias_leaf(b.to(y).expand_as(y))

                return linear

            return make_linear
        if type(child).__name__.endswith("RMSNorm") and isinstance(norm, rules.RMSNorm):
            rule = norm

            def frozen(x: Tensor) -> Tensor:
                return x * rule.factor(child, x.detach(), x.dtype)

            return lambda own: frozen
        if any(True for _ in child.parameters()):
            raise UnsupportedOptionError(
                f"rules={self.rule_set.name!r}: {type(child).__name__} inside {type(owner).__name__} "
                "has no rule that credits queries and keys; use rules='exact'"
            )
        return None

    def mixer(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        """A state-space layer (:mod:`llama_attrib.rules.mamba`): its selection frozen from the
        real input, a linear map of the pass's tensor; its biases as a leaf."""
        rule = self.session.family.mixer
        # a rule set without a rule refuses (before any work: families.refuse_missing_rules)
        uniform = not self.rule_set.mlp(rule, module).frozen
        x = hidden_states(args, kwargs)
        real = model_dtype(module, self.session.model_dtype)
        frozen = rule.factors(module, x.detach().to(real), kwargs.get("attention_mask"), x.dtype, uniform)
        out: Tensor = rule.apply(module, frozen, x)
        bias = rule.bias(module, frozen, x)
        return out if bias is None else out + self.bias_leaf(bias.to(out))

    def mlp(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        maths: Any = self.session.family.mlp_rule(module)
        rule = self.rule_set.mlp(maths, module)
        x = args[0]
        real = model_dtype(module, self.session.model_dtype)
        factors = rule.factors(maths, module, x.detach().to(real), x.dtype)
        out = split_at(self._keep(module), x, lambda part, t0: rule.apply(maths, module, factors, part, t0))
        bias = rule.bias(maths, module, factors)
        out = out if bias is None else out + self.bias_leaf(bias.to(out))
        missing = rule.unassigned(maths, module, factors)
        out = out if missing is None else out + _leaf(missing.to(out), self.unassigned_leaves)
        if maths.returns_router_logits(module):
            return out, None
        return out


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's linear map, its weight stored [in, out]


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
