"""State of one wrapped model, and the replacement forwards of its role modules.

All state lives on a :class:`Session` stored on the model instance (never in module
globals), so two wrapped models never share anything; what one decomposing forward needs and
collects lives on a :class:`Call`. Each replacement forward asks whether a call is running
and in which mode; with none it calls the original forward and nothing else.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import _compat, families, rules
from ._attention import ATTENTION_NAME, PROBE, Probe, register_attention
from ._compat import cache_length, find_cache
from .errors import DecompositionError
from .patching import Patch, replace_method, replace_value, restore_all
from .stream import DecomposedTensor, split

Forward = Callable[..., Any]


def argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


@dataclass
class Call:
    """One decomposing forward: how it carries the decomposition, and what it collects.

    ``mode``: ``"forward"`` (components beside the real hidden state), ``"target"`` (one
    decoder layer, or the final norm, as a differentiable frozen-factor pass: see
    :mod:`llama_attrib.sweep`) or ``"capture"`` (a plain forward that only records the LM
    head's output). ``offset``: positions already in the cache; ``layout``: which positions
    each component holds (a finished sequence); ``keep_from``: target mode's first explained
    position (the last layer's outputs before it reach no explained logit); ``probabilities``:
    target mode's ``(bytes computed at a time, bytes kept for the backward)`` of attention
    probabilities, where a memory budget needs them smaller than the defaults.
    """

    mode: str
    dtype: torch.dtype
    offset: int = 0
    layout: rules.Layout | None = None
    keep_from: int = 0
    probabilities: tuple[int, int] | None = None
    # collected during the call
    head: tuple[Tensor, Tensor, Tensor | None] | None = None  # LM head input: real, components, bias share
    logits: Tensor | None = None  # the LM head's own output (before any soft-cap)
    bias_leaves: list[Tensor] = field(default_factory=list)  # target mode: every bias, as a leaf
    flow: FlowRecord | None = None  # forward mode: what each block adds at one position

    def bias_leaf(self, bias: Tensor) -> Tensor:
        """Target mode: a bias as a leaf of the pass, so the backward gives its share."""
        leaf = bias.detach().clone().requires_grad_(True)
        self.bias_leaves.append(leaf)
        return leaf


@dataclass
class FlowRecord:
    """Forward mode, one position: each block's output there, before it joins the residual
    stream (attention: every head's mixed values before the output projection), and the
    norms' frozen factors there. Keyed by ``id(module)``; values ``(components, bias share)``."""

    position: int
    attention: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    mlp: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    norm: dict[int, Tensor] = field(default_factory=dict)

    def recorder(self, module: nn.Module) -> tuple[int, Callable[[Tensor, Tensor | None], None]]:
        """``(position, record)`` for :func:`rules.attention`."""

        def record(comps: Tensor, residual: Tensor | None) -> None:
            self.attention[id(module)] = (comps, residual)

        return self.position, record


class Session:
    """What llama_attrib keeps for one wrapped model between calls: its family, its patches,
    the decomposed value caches of a generation, and the current :class:`Call`, if any."""

    def __init__(self, model: nn.Module, family: families.Family) -> None:
        self.family = family
        self.logit_scale = family.logit_scale(model)
        self.dtype = families.component_dtype(model)
        self.patches: list[Patch] = []
        self.forced = 0  # depth of enclosing ``decompose()`` blocks
        self.plain = 0  # > 0 while target-mode generate runs plain forwards
        self.record: list[tuple[Any, Any]] | None = None  # masks and positions generate passed
        self.steps: list[Any] | None = None  # collecting a decomposed generate
        self.expected_length = 0  # final sequence length of the generate call, if known
        self.call: Call | None = None
        self.last_layer: set[int] = set()  # the last layer's attention and MLP
        self._caches: dict[int, rules.ValueCache] = {}
        self._owners: dict[int, weakref.ref[Any]] = {}

    def wants(self, decompose: bool | str | None) -> bool:
        """Whether a call decomposes: an explicit ``decompose=`` wins over the context."""
        if decompose is not None:
            return decompose is not False
        if self.plain:
            return False
        return self.forced > 0 or self.steps is not None

    @contextmanager
    def running(self, call: Call) -> Iterator[Call]:
        """Make ``call`` the current one for the block (one at a time); a failed forward-mode
        call drops the decomposed caches it may have half written."""
        if self.call is not None:
            raise DecompositionError("a decomposed forward was called from inside another one")
        if call.mode == "forward" and call.offset == 0:
            self.clear_caches()
        self.call = call
        try:
            yield call
        except BaseException:
            if call.mode == "forward":
                self.clear_caches()
            raise
        finally:
            self.call = None

    def _current(self, *modes: str) -> Call | None:
        call = self.call
        return call if call is not None and call.mode in modes else None

    def clear_caches(self) -> None:
        self._caches.clear()
        self._owners.clear()

    def value_cache(self, layer_idx: int, cache: Any) -> rules.ValueCache | None:
        """This layer's decomposed cache, checked against the transformers cache it mirrors."""
        if cache is None:
            return None
        past = cache_length(cache, layer_idx)
        offset = self.call.offset if self.call is not None else 0
        if past != offset:
            raise DecompositionError(
                f"layer {layer_idx}'s cache holds {past} positions, the call began with "
                f"{offset}: caches that differ per layer are not supported"
            )
        if past == 0:
            self._caches[layer_idx] = rules.ValueCache(self.expected_length)
            self._owners[layer_idx] = weakref.ref(cache)
        entry = self._caches.get(layer_idx)
        owner = self._owners.get(layer_idx)
        if entry is None or owner is None or owner() is not cache or entry.length != past:
            raise DecompositionError(
                f"the cache passed in holds {past} positions that were not decomposed by this "
                "model's decomposed calls; decompose from an empty cache (or none), e.g. "
                "generate with decompose=True from the start"
            )
        return entry

    # -- installing the leaf rules ----------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Patch every role's forward; on any failure undo what was done."""
        makers = {
            families.EMBEDDING: self._embedding,
            families.NORM: self._norm,
            families.ATTENTION: self._attention,
            families.MLP: self._mlp,
            families.LM_HEAD: self._lm_head,
        }
        last_layer = self.family.layers(model)[-1]
        self.last_layer = {
            id(m) for _, role, m in self.family.layer_modules(last_layer) if role != families.NORM
        }
        register_attention()
        try:
            for role, module in families.roles(model, self.family):
                self.patches.append(replace_method(module, "forward", _bind(makers[role], module)))
                if role == families.ATTENTION:
                    self.patches.append(replace_value(module, PROBE, Probe()))
        except BaseException:
            restore_all(self.patches)
            raise

    def restore(self) -> None:
        restore_all(self.patches)
        self.clear_caches()

    def _logits(self, head_output: Tensor) -> Tensor:
        """The logits the LM head's output becomes (before any soft-cap): a family's
        ``logits_scaling`` is applied to what the call keeps, not to what the model receives."""
        return head_output if self.logit_scale == 1.0 else head_output * self.logit_scale

    def _embedding(self, module: nn.Module, original: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if (call := self._current("forward")) is None:
                return out
            return DecomposedTensor.wrap(out, rules.embedding(out, call.offset, call.dtype, call.layout))

        return forward

    def _norm(self, module: nn.Module, original: Forward) -> Forward:
        rule = self.family.norm
        bias = rule.bias(module)

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if (call := self._current("target")) is not None:
                out = rule.apply(rule.factor(module, x.detach(), x.dtype), x)
                return out if bias is None else out + call.bias_leaf(bias.to(out).expand_as(out))
            if (call := self._current("forward")) is None:
                return original(x, *args, **kwargs)
            real, comps, residual = split(x)
            factor = rule.factor(module, real, comps.dtype)
            if call.flow is not None:
                call.flow.norm[id(module)] = factor[:, call.flow.position].clone()
            res = None if residual is None else rule.apply(factor, residual)
            if bias is not None:
                res = bias.to(comps).expand(real.shape) + (0 if res is None else res)
            return DecomposedTensor.wrap(original(real, *args, **kwargs), rule.apply(factor, comps), res)

        return forward

    def _mlp(self, module: nn.Module, original: Forward) -> Forward:
        rule: Any = self.family.mlp_rule(module)  # GatedMLP or SparseMoE: the same interface

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if (call := self._current("target")) is not None:
                gate = rule.factors(module, x.detach().to(_dtype_of(module)), x.dtype)
                keep = call.keep_from if id(module) in self.last_layer else 0
                out = _split_at(keep, x, lambda part, t0: rule.apply(module, gate, part, t0))
                bias = rule.bias(module, gate)
                out = out if bias is None else out + call.bias_leaf(bias.to(out))
                if _compat.moe_returns_router_logits(module):
                    return out, None
                return out
            if (call := self._current("forward")) is None:
                return original(x, *args, **kwargs)
            real, comps, residual = split(x)
            stock = original(real, *args, **kwargs)
            gate = rule.factors(module, real, comps.dtype)
            width = rule.width(module)
            comps_out = rules._positionwise(
                lambda part, t0: rule.apply(module, gate, part, t0), comps, call.offset, width, call.layout
            )
            res = None if residual is None else rule.apply(module, gate, residual)
            bias = rule.bias(module, gate)
            if bias is not None:
                res = bias if res is None else res + bias
            if call.flow is not None:
                t = call.flow.position
                # copies: a view would keep the whole [C, B, q, hidden] output alive
                call.flow.mlp[id(module)] = (
                    comps_out[:, :, t].clone(),
                    None if res is None else res[:, t].clone(),
                )
            if _compat.moe_returns_router_logits(module):  # (hidden, router logits)
                return (DecomposedTensor.wrap(stock[0], comps_out, res), *stock[1:])
            return DecomposedTensor.wrap(stock, comps_out, res)

        return forward

    def _attention(self, module: nn.Module, original: Forward) -> Forward:
        rule = self.family.attention
        head_dim = self.family.head_dim(module)

        def stock(args: tuple[Any, ...], kwargs: dict[str, Any], skip: bool) -> Any:
            """The stock forward through llama_attrib's attention function: the probabilities'
            inputs are recorded from the queries and keys the family's own code made."""
            probe: Probe = module.__dict__[PROBE]
            probe.skip, probe.scores = skip, None
            config: Any = module.config
            previous = config._attn_implementation_internal
            probe.original = previous
            config._attn_implementation_internal = ATTENTION_NAME
            try:
                out = original(*args, **kwargs)
            finally:
                config._attn_implementation_internal = previous
            scores, probe.scores = probe.scores, None  # the probe keeps nothing after the call
            output, probe.output = probe.output, None
            if scores is not None and output is not None:
                scores = replace(scores, mixed=output.flatten(2))
            if scores is None:
                raise DecompositionError(f"{type(module).__name__} did not call its attention function")
            return out, scores

        def forward(*args: Any, **kwargs: Any) -> Any:
            if (call := self._current("target")) is not None:
                x = argument(args, kwargs, "hidden_states", 0)
                args, kwargs = replace_hidden(args, kwargs, x.detach().to(_dtype_of(module)))
                with torch.no_grad():
                    # the real mix of the values is the forward's value of the frozen one (no
                    # probabilities computed), unless they are small enough to keep for the backward
                    # or the model computes in another dtype than the components
                    _, scores = stock(args, kwargs, skip=call.dtype != _dtype_of(module))
                keep = call.keep_from if id(module) in self.last_layer else 0
                if call.probabilities is not None:
                    block, kept = call.probabilities
                    scores = replace(scores, block=block, keep=kept)
                return rules.attention_graph(rule, module, head_dim, scores, x, call.bias_leaf, keep), None
            if (call := self._current("forward")) is None:
                return original(*args, **kwargs)
            real, comps, residual = split(argument(args, kwargs, "hidden_states", 0))
            args, kwargs = replace_hidden(args, kwargs, real)
            found = find_cache(kwargs, self.family.cache_keywords())
            cache = self.value_cache(int(module.layer_idx), found)  # type: ignore[arg-type]
            (out, weights), scores = stock(args, kwargs, skip=False)
            record = None if call.flow is None else call.flow.recorder(module)
            comps_out, res = rules.attention(
                rule,
                module,
                head_dim,
                scores.rows(),
                comps,
                residual,
                cache,
                call.offset,
                call.layout,
                record,
            )
            return DecomposedTensor.wrap(out, comps_out, res), weights

        return forward

    def _lm_head(self, module: nn.Module, original: Forward) -> Forward:
        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            call = self._current("forward", "capture")  # target mode runs decoder layers only
            if call is None:
                return original(x, *args, **kwargs)
            if call.mode == "capture":
                out = original(x, *args, **kwargs)
                call.logits = self._logits(out)  # the stock logits before any soft-cap
                return out
            real, comps, residual = split(x)
            out = original(real, *args, **kwargs)
            call.logits = self._logits(out)
            call.head = (real, comps, residual)
            return out

        return forward


def _split_at(keep: int, x: Tensor, apply: Callable[[Tensor, int], Tensor]) -> Tensor:
    """A position-wise rule in target mode, in pieces of :data:`rules.mlp.ROWS` positions; with
    ``keep``, a graph only from that position (the positions before it get none)."""
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


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def replace_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], value: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "hidden_states" in kwargs or not args:
        return args, {**kwargs, "hidden_states": value}
    return (value, *args[1:]), kwargs


def _bind(maker: Callable[[nn.Module, Forward], Forward], module: nn.Module) -> Callable[[Forward], Forward]:
    def make(original: Forward) -> Forward:
        return maker(module, original)

    return make


def tolerance(dtype: torch.dtype) -> float:
    """How far a sum of components may be from what it explains, relative to the largest
    value: float32 1e-5 (measured 1.7e-6 at most, scripts/measure_guards.py), float64 1e-6,
    half precision 5e-2 (the model's own rounding)."""
    return {torch.float64: 1e-6, torch.float32: 1e-5}.get(dtype, 5e-2)


def completeness_error(real: Tensor, comps: Tensor) -> float:
    """Largest ``|sum(components) - real|`` relative to the largest ``|real|``."""
    if real.numel() == 0:
        return 0.0
    total = comps.sum(0).to(torch.float64)
    scale = real.abs().max().clamp(min=1e-30).double()
    return float(((total - real.double()).abs().max() / scale).item())
