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
from torch import Tensor, nn

from . import families, linear, rules
from ._compat import cache_length, find_cache
from .errors import DecompositionError
from .patching import Patch, replace_method, restore_all
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
        self.head: tuple[Tensor, Tensor] | None = None  # LM head input: real, components
        self.expected_length = 0  # final sequence length of the generate call, if known
        # Target mode: the leaves run the differentiable frozen-factor pass (see linear.py).
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

    def end(self, failed: bool) -> tuple[Tensor, Tensor] | None:
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
        """Patch every leaf module's forward; on any failure undo what was done."""
        makers = {
            families.EMBEDDING: self._embedding,
            families.NORM: self._norm,
            families.ATTENTION: self._attention,
            families.MLP: self._mlp,
            families.LM_HEAD: self._lm_head,
        }
        last_layer: Any = model.model.layers[-1]  # type: ignore[union-attr, index]
        self.last_layer = {id(last_layer.self_attn), id(last_layer.mlp)}
        try:
            for role, module in families.roles(model, self.family):
                self.patches.append(replace_method(module, "forward", _bind(makers[role], module)))
        except BaseException:
            restore_all(self.patches)
            raise

    def restore(self) -> None:
        restore_all(self.patches)
        self.clear_caches()

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
        return self._positionwise(module, original, rules.rms_norm, linear.rms_norm)

    def _mlp(self, module: nn.Module, original: Forward) -> Forward:
        return self._positionwise(
            module, original, lambda m, x, c: rules.mlp(m, x, c, self.offset, self.layout), linear.mlp
        )

    def _positionwise(
        self,
        module: nn.Module,
        original: Forward,
        rule: Callable[[nn.Module, Tensor, Tensor], Tensor],
        linear_rule: Callable[[nn.Module, Tensor], Tensor],
    ) -> Forward:
        """A leaf whose real output comes from ``original(real)`` and components from ``rule``."""

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if self.linear_dtype is not None:
                return self._last_layer_split(module, x, lambda part: linear_rule(module, part))
            if not self.active:
                return original(x, *args, **kwargs)
            real, comps = split(x)
            out = original(real, *args, **kwargs)
            return DecomposedTensor.wrap(out, rule(module, real, comps))

        return forward

    def _keep_from(self, module: nn.Module) -> int:
        """Target mode: the first position whose output of ``module`` is read (0: all are)."""
        return self.keep_from if id(module) in self.last_layer else 0

    def _last_layer_split(self, module: nn.Module, x: Tensor, rule: Callable[[Tensor], Tensor]) -> Tensor:
        """A position-wise linear-mode rule; in the last layer, with a graph only where it is read."""
        keep = self._keep_from(module)
        if keep <= 0 or keep >= x.shape[1]:
            return rule(x)
        with torch.no_grad():
            head = rule(x[:, :keep].detach())
        return torch.cat([head, rule(x[:, keep:])], dim=1)

    def _attention(self, module: nn.Module, original: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.linear_dtype is not None:
                x = _argument(args, kwargs, "hidden_states", 0)
                embeddings = _argument(args, kwargs, "position_embeddings", 1)
                mask = _argument(args, kwargs, "attention_mask", 2)
                return linear.attention(module, x, embeddings, mask, self._keep_from(module)), None
            if not self.active:
                return original(*args, **kwargs)
            real, comps = split(_argument(args, kwargs, "hidden_states", 0))
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = real
            else:
                args = (real, *args[1:])
            cache = self.value_cache(int(module.layer_idx), find_cache(kwargs))  # type: ignore[arg-type]
            out, weights = original(*args, **kwargs)
            comps_out = rules.attention(
                module,
                real,
                comps,
                _argument(args, kwargs, "position_embeddings", 1),
                _argument(args, kwargs, "attention_mask", 2),
                cache,
                self.offset,
                self.layout,
            )
            return DecomposedTensor.wrap(out, comps_out), weights

        return forward

    def _lm_head(self, module: nn.Module, original: Forward) -> Forward:
        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if self.linear_dtype is not None:
                self.head = (x, x)
                with torch.no_grad():
                    return linear.linear(x.detach(), module)
            if not self.active:
                return original(x, *args, **kwargs)
            real, comps = split(x)
            self.head = (real, comps)
            return original(real, *args, **kwargs)

        return forward


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
