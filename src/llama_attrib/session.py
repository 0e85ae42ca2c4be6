"""State of one wrapped model, and the replacement forwards of its leaf modules.

All state lives on a :class:`Session` stored on the model instance (never in module
globals), so two wrapped models never share anything. Each replacement forward first asks
whether this call decomposes; if not it calls the original forward and nothing else.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _offload, families, rules
from ._attention import ATTENTION_NAME, PROBE, Probe, register_attention
from ._compat import cache_length, find_cache
from .errors import DecompositionError
from .patching import Patch, replace_method, replace_value, restore_all
from .stream import DecomposedTensor, split

Forward = Callable[..., Any]


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


class Session:
    """Everything llama_attrib keeps for one wrapped model."""

    def __init__(self, model: nn.Module, family: families.Family) -> None:
        self.family = family
        self.dtype = families.component_dtype(model)
        self.patches: list[Patch] = []
        self.forced = 0  # depth of enclosing ``decompose()`` blocks
        self.plain = 0  # > 0 while target-mode generate runs plain forwards
        self.record: list[tuple[Any, Any]] | None = None  # masks and positions generate passed
        self.steps: list[Any] | None = None  # collecting a decomposed generate
        self.active = False  # the current forward decomposes
        self.offset = 0  # positions already in the cache when the current forward began
        self.head: tuple[Tensor, Tensor, Tensor | None] | None = (
            None  # LM head input: real, components, bias share
        )
        self.head_logits: Tensor | None = None  # the LM head's own output (before any soft-cap)
        self.capture_logits = False  # plain forwards record head_logits too
        self.bias_leaves: list[Tensor] = []  # target mode: the biases of the pass, as leaves
        self.expected_length = 0  # final sequence length of the generate call, if known
        # Target mode: the roles run the differentiable frozen-factor pass (rules' linear parts).
        self.linear_dtype: torch.dtype | None = None
        self.embeds: Tensor | None = None  # the embeddings (leaf requiring grad) of that pass
        # First position whose logits that pass explains: the last layer's attention and MLP
        # outputs before it reach no explained logit, so they are computed without a graph.
        self.keep_from = 0
        self.last_layer: set[int] = set()
        # Forward mode over a finished sequence: which positions each component holds.
        self.layout: rules.Layout | None = None
        self._caches: dict[int, rules.ValueCache] = {}
        self._owners: dict[int, weakref.ref[Any]] = {}

    def wants(self, decompose: bool | str | None) -> bool:
        """Whether a call decomposes: an explicit ``decompose=`` wins over the context."""
        if decompose is not None:
            return decompose is not False
        if self.plain:
            return False
        return self.forced > 0 or self.steps is not None

    # -- one decomposed forward -------------------------------------------------------
    def begin(self, offset: int) -> None:
        if self.active:
            raise DecompositionError("a decomposed forward was called from inside another one")
        if offset == 0:
            self.clear_caches()
        self.active, self.offset, self.head = True, offset, None

    def end(self, failed: bool) -> tuple[Tensor, Tensor, Tensor | None] | None:
        head, self.active, self.head = self.head, False, None
        if failed:
            self.clear_caches()
        return head

    def clear_caches(self) -> None:
        self._caches.clear()
        self._owners.clear()

    def value_cache(self, layer_idx: int, cache: Any) -> rules.ValueCache | None:
        """This layer's decomposed cache, checked against the transformers cache it mirrors."""
        if cache is None:
            return None
        past = cache_length(cache, layer_idx)
        if past != self.offset:
            raise DecompositionError(
                f"layer {layer_idx}'s cache holds {past} positions, the call began with "
                f"{self.offset}: caches that differ per layer are not supported"
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
        last_layer: Any = model.model.layers[-1]  # type: ignore[union-attr, index]
        self.last_layer = {
            id(m) for role, m in _layer_roles(last_layer, self.family) if role != families.NORM
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

    def bias_leaf(self, bias: Tensor) -> Tensor:
        """Target mode: a bias as a leaf of the pass, so the backward gives its share."""
        leaf = bias.detach().clone().requires_grad_(True)
        self.bias_leaves.append(leaf)
        return leaf

    def _embedding(self, module: nn.Module, original: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.linear_dtype is not None:
                with torch.no_grad():
                    out = original(*args, **kwargs)
                self.embeds = out.to(self.linear_dtype).clone().requires_grad_(True)
                return self.embeds
            out = original(*args, **kwargs)
            if not self.active:
                return out
            return DecomposedTensor.wrap(out, rules.embedding(out, self.offset, self.dtype, self.layout))

        return forward

    def _norm(self, module: nn.Module, original: Forward) -> Forward:
        offset = self.family.norm_offset

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if self.linear_dtype is not None:
                return rules.scale(x, rules.norm_factor(module, x.detach(), x.dtype, offset))
            if not self.active:
                return original(x, *args, **kwargs)
            real, comps, residual = split(x)
            factor = rules.norm_factor(module, real, comps.dtype, offset)
            res = None if residual is None else rules.scale(residual, factor)
            return DecomposedTensor.wrap(original(real, *args, **kwargs), rules.scale(comps, factor), res)

        return forward

    def _mlp(self, module: nn.Module, original: Forward) -> Forward:
        rule: Any = self.family.mlp  # GatedMLP or SparseMoE: the same interface

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if self.linear_dtype is not None:
                gate = rule.factors(module, x.detach().to(_dtype_of(module)), x.dtype)
                out = self._last_layer_split(
                    module, x, lambda part, t0: rule.apply(module, gate, part, t0), gate
                )
                bias = rule.bias(module, gate)
                out = out if bias is None else out + self.bias_leaf(bias.to(out))
                if isinstance(rule, rules.SparseMoE) and rule.returns_router_logits(module):
                    return out, None
                return out
            if not self.active:
                return original(x, *args, **kwargs)
            real, comps, residual = split(x)
            stock = original(real, *args, **kwargs)
            gate = rule.factors(module, real, comps.dtype)
            width = rule.width(module)
            comps_out = rules._positionwise(
                lambda part, t0: rule.apply(module, gate, part, t0), comps, self.offset, width, self.layout
            )
            res = None if residual is None else rule.apply(module, gate, residual)
            bias = rule.bias(module, gate)
            if bias is not None:
                res = bias if res is None else res + bias
            if isinstance(stock, tuple):  # transformers 4.x MoE blocks return (hidden, router logits)
                return (DecomposedTensor.wrap(stock[0], comps_out, res), *stock[1:])
            return DecomposedTensor.wrap(stock, comps_out, res)

        return forward

    def _keep_from(self, module: nn.Module) -> int:
        """Target mode: the first position whose output of ``module`` is read (0: all are)."""
        return self.keep_from if id(module) in self.last_layer else 0

    def _last_layer_split(
        self, module: nn.Module, x: Tensor, apply: Callable[[Tensor, int], Tensor], factors: Any
    ) -> Tensor:
        """A position-wise rule; in the last layer, with a graph only where it is read."""
        keep = self._keep_from(module)
        if keep <= 0 or keep >= x.shape[1]:
            return apply(x, 0)
        with torch.no_grad():
            whole = apply(x.detach(), 0)
        return torch.cat([whole[:, :keep], apply(x[:, keep:], keep)], dim=1)

    def _attention(self, module: nn.Module, original: Forward) -> Forward:
        rule = self.family.attention
        probe: Probe = module.__dict__[PROBE] if PROBE in module.__dict__ else Probe()

        def call(args: tuple[Any, ...], kwargs: dict[str, Any], skip: bool) -> Any:
            """The stock forward through llama_attrib's attention function: the probabilities
            are recorded from the queries and keys the family's own code made."""
            probe = module.__dict__[PROBE]
            probe.skip, probe.probs = skip, None
            config: Any = module.config
            previous = config._attn_implementation_internal
            probe.original = previous
            config._attn_implementation_internal = ATTENTION_NAME
            try:
                out = original(*args, **kwargs)
            finally:
                config._attn_implementation_internal = previous
            if probe.probs is None:
                raise DecompositionError(f"{type(module).__name__} did not call its attention function")
            return out, probe.probs

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.linear_dtype is not None:
                x = _argument(args, kwargs, "hidden_states", 0)
                real = x.detach().to(_dtype_of(module))
                args, kwargs = _replace_hidden(args, kwargs, real)
                with torch.no_grad():
                    _, probs = call(args, kwargs, skip=True)
                out = rules.attention_graph(rule, module, probs, x, self.bias_leaf, self._keep_from(module))
                return out, None
            if not self.active:
                return original(*args, **kwargs)
            real, comps, residual = split(_argument(args, kwargs, "hidden_states", 0))
            args, kwargs = _replace_hidden(args, kwargs, real)
            cache = self.value_cache(int(module.layer_idx), find_cache(kwargs))  # type: ignore[arg-type]
            (out, weights), probs = call(args, kwargs, skip=False)
            comps_out, res = rules.attention(
                rule, module, probs, comps, residual, cache, self.offset, self.layout
            )
            return DecomposedTensor.wrap(out, comps_out, res), weights

        del probe
        return forward

    def _lm_head(self, module: nn.Module, original: Forward) -> Forward:
        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if self.linear_dtype is not None:
                self.head = (x, x, None)
                with torch.no_grad():
                    logits = F.linear(x.detach(), _offload.weight(module).to(x))
                self.head_logits = logits
                return logits
            if not self.active:
                logits = original(x, *args, **kwargs)
                if self.capture_logits:
                    self.head_logits = logits  # the stock logits before any soft-cap
                return logits
            real, comps, residual = split(x)
            logits = original(real, *args, **kwargs)
            self.head = (real, comps, residual)
            self.head_logits = logits
            return logits

        return forward


def _layer_roles(layer: nn.Module, family: families.Family) -> list[tuple[str, nn.Module]]:
    found = []
    for attr, role in family.layer_roles.items():
        module = getattr(layer, attr, None) or getattr(layer, families.ALTERNATIVES.get(attr, ""), None)
        if module is not None:
            found.append((role, module))
    return found


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def _replace_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], value: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "hidden_states" in kwargs or not args:
        return args, {**kwargs, "hidden_states": value}
    return (value, *args[1:]), kwargs


def _bind(maker: Callable[[nn.Module, Forward], Forward], module: nn.Module) -> Callable[[Forward], Forward]:
    def make(original: Forward) -> Forward:
        return maker(module, original)

    return make


def completeness_error(real: Tensor, comps: Tensor) -> float:
    """Largest ``|sum(components) - real|`` relative to the largest ``|real|``."""
    if real.numel() == 0:
        return 0.0
    total = comps.sum(0).to(torch.float64)
    scale = real.abs().max().clamp(min=1e-30).double()
    return float(((total - real.double()).abs().max() / scale).item())
