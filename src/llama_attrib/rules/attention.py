"""The attention rule in both modes: the probabilities frozen, the values and the output
projection linear; forward mode's decomposed value cache."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _compat
from ..errors import DecompositionError
from .kernels import frozen_mix
from .latent import BoundLatentValue, LatentValue
from .linear import Layout, Proj, causal_chunks, first_nonzero, positionwise
from .scores import FrozenProbabilities, mix


@dataclass(frozen=True)
class Attention:
    """``out(probs @ value(x))``: probabilities frozen (from the stock attention function,
    after the family's rope, q/k norms, scaling, mask, sliding window and soft-cap). ``value``:
    a projection, or a latent attention's map (:class:`.latent.LatentValue`), which a call
    binds to its real input (:meth:`bound`)."""

    value: Proj | LatentValue | BoundLatentValue
    out: Proj

    def bound(self, module: nn.Module, real: Tensor) -> Attention:
        """The rule for one call on ``real``: a value map with frozen factors gets them."""
        if isinstance(self.value, LatentValue):
            return replace(self, value=self.value.bind(module, real))
        return self


class ValueCache:
    """One layer's decomposed values, ``[C_cap, batch, kv_heads, S_cap, head_dim]``.

    The keys live in the stock cache (the attention function receives all of them); this
    holds what the stock cache cannot: each component's values, and the bias share's
    (``residual``). Buffers grow in place, so a generation step costs what its own maths
    costs. Component-major with ``C == S``, so the first ``C`` components are a view.
    """

    def __init__(self, expected_length: int = 0) -> None:
        self.length = 0
        self.expected_length = expected_length
        self._values: Tensor | None = None
        self._residual: Tensor | None = None

    def append(self, values: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Add ``values [C, B, kv, q, hd]`` (and ``residual [B, kv, q, hd]``); return all of both."""
        q = values.shape[3]
        end = self.length + q
        if values.shape[0] != end:
            raise DecompositionError(
                f"decomposed cache holds {self.length} positions but the new values have "
                f"{values.shape[0]} components for {q} new positions"
            )
        self._reserve(end, values)
        assert self._values is not None
        self._values[:end, :, :, self.length : end] = values
        if residual is not None:
            if self._residual is None:
                b, kv, _, hd = residual.shape
                self._residual = residual.new_zeros((b, kv, self._values.shape[3], hd))
            self._residual[:, :, self.length : end] = residual
        self.length = end
        kept = None if self._residual is None else self._residual[:, :, :end]
        return self._values[:end, :, :, :end], kept

    def _reserve(self, needed: int, values: Tensor) -> None:
        capacity = 0 if self._values is None else self._values.shape[0]
        if needed <= capacity:
            return
        # First to the expected length (a generate call knows it), then by a quarter: the
        # buffer is quadratic in length, so doubling would waste up to 3/4 of it.
        capacity = max(needed, self.expected_length, capacity + capacity // 4, 16)
        _, b, kv, _, hd = values.shape
        new_values = values.new_zeros((capacity, b, kv, capacity, hd))
        if self._values is not None:
            n = self.length
            new_values[:n, :, :, :n] = self._values[:n, :, :, :n]
        if self._residual is not None:
            grown = self._residual.new_zeros((b, kv, capacity, hd))
            grown[:, :, : self.length] = self._residual[:, :, : self.length]
            self._residual = grown
        self._values = new_values


def _value_map(rule: Attention) -> Proj | BoundLatentValue:
    if isinstance(rule.value, LatentValue):
        raise DecompositionError("a latent attention's value map is used unbound: call Attention.bound first")
    return rule.value


def _value_heads(values: Tensor, hd: int) -> Tensor:
    """``[..., B, q, kv*hd]`` -> ``[..., B, kv, q, hd]``."""
    return values.view(*values.shape[:-1], -1, hd).transpose(-2, -3)


@torch.no_grad()
def attention(
    rule: Attention,
    module: nn.Module,
    hd: int,
    probs: Tensor,
    comps: Tensor,
    residual: Tensor | None,
    cache: ValueCache | None,
    offset: int,
    layout: Layout | None = None,
    record: tuple[int, Callable[[Tensor, Tensor | None], None]] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Forward mode: the components (and bias share) of the attention's output (``hd``: the
    size of one head).

    ``record``: ``(position, callback)``, a flow recorder given every head's mixed values
    (before the output projection) at that query position: components ``[C, B, heads*hd]``
    and bias share."""
    c, batch, q, _ = comps.shape
    kv, groups = probs.shape[1], probs.shape[2]
    heads = kv * groups * hd
    probs = probs.to(comps.dtype)
    value = _value_map(rule)
    values = positionwise(lambda part, t0: value.linear(module, part, t0), comps, offset, kv * hd, layout)
    values = _value_heads(values, hd)  # [C, B, kv, q, hd]
    b_v = value.bias(module)
    res_values = None
    if residual is not None or b_v is not None:
        res = comps.new_zeros((batch, q, kv * hd)) if residual is None else value.linear(module, residual)
        res_values = _value_heads(res if b_v is None else res + b_v.to(res), hd)
    if cache is not None:
        values, res_values = cache.append(values, res_values)
    s = values.shape[3]
    if probs.shape[-1] < s:
        # A sliding-window cache hands the attention only the most recent keys: the older
        # positions get probability zero (they are outside every query's window).
        probs = F.pad(probs, (s - probs.shape[-1], 0))
    if record is not None:
        t, callback = record
        at = probs[:, :, :, t : t + 1]
        callback(mix(at, values)[..., 0, :], None if res_values is None else mix(at, res_values)[:, 0])
    res_out = None
    if res_values is not None:
        res_out = rule.out.linear(module, mix(probs, res_values))
    b_o = rule.out.bias(module)
    if b_o is not None:
        res_out = b_o.to(comps) + (0 if res_out is None else res_out)

    if groups * q <= hd:
        # Few queries (generation steps): batch over components, reading the cache as a view.
        return rule.out.linear(module, mix(probs, values)), res_out

    def part(c0: int, c1: int, t0: int) -> Tensor:
        # Many queries (a prompt): components go into the matrix columns, one big matmul.
        # Components c0:c1 have no value before key k0 and no output before query t0.
        n, rows, k0 = c1 - c0, q - t0, first_nonzero(layout, c0, c1)
        p = probs[:, :, :, t0:, k0:].reshape(batch, kv, groups * rows, s - k0)
        cols = values[c0:c1, :, :, k0:].permute(1, 2, 3, 0, 4).reshape(batch, kv, s - k0, n * hd)
        out = torch.matmul(p, cols).view(batch, kv, groups, rows, n, hd).permute(4, 0, 3, 1, 2, 5)
        return rule.out.linear(module, out.reshape(n, batch, rows, heads))

    return causal_chunks(part, c, batch, q, offset, 2 * heads, layout), res_out


def attention_graph(
    rule: Attention,
    module: nn.Module,
    hd: int,
    scores: FrozenProbabilities,
    x: Tensor,
    bias: Callable[[Tensor], Tensor],
    keep_from: int = 0,
) -> Tensor:
    """Target mode: the same map on the differentiable input ``x [B, q, hidden]`` (``hd``: the
    size of one head).

    ``bias(b)`` turns a bias into a tensor the pass can differentiate against (its share).
    Outputs at query positions before ``keep_from`` are computed without a graph (in the
    last layer they reach no explained logit): the backward then skips them.
    """
    value = _value_map(rule)
    values = value.linear(module, x)
    b_v = value.bias(module)
    if b_v is not None:
        values = values + bias(b_v.to(x).expand_as(values))
    values = _value_heads(values, hd)

    def out(v: Tensor, t0: int, t1: int) -> Tensor:
        o = rule.out.linear(module, frozen_mix(scores, v, t0, t1))
        b_o = rule.out.bias(module)
        return o if b_o is None else o + bias(b_o.to(o).expand_as(o))

    q = x.shape[1]
    if not 0 < keep_from < q:
        return out(values, 0, q)
    with torch.no_grad():
        before = out(values.detach(), 0, keep_from)
    return torch.cat([before, out(values, keep_from, q)], dim=1)


class ValueCaches:
    """The decomposed values of a wrapped model's cached positions, one
    :class:`ValueCache` per layer, each tied to the transformers cache it mirrors."""

    def __init__(self) -> None:
        self._caches: dict[int, ValueCache] = {}
        self._owners: dict[int, weakref.ref[Any]] = {}
        self.states: dict[int, Any] = {}  # a state-space layer's past (rules.mamba.MambaState), by module

    def clear(self) -> None:
        self._caches.clear()
        self._owners.clear()
        self.states.clear()

    def of(self, layer_idx: int, cache: Any, offset: int, expected_length: int) -> ValueCache | None:
        """This layer's decomposed cache, checked against the transformers cache it mirrors
        (``offset``: the positions the call began with)."""
        if cache is None:
            return None
        past = _compat.cache_length(cache, layer_idx)
        if past != offset:
            raise DecompositionError(
                f"layer {layer_idx}'s cache holds {past} positions, the call began with "
                f"{offset}: caches that differ per layer are not supported"
            )
        if past == 0:
            self._caches[layer_idx] = ValueCache(expected_length)
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
