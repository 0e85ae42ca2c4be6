"""The decomposition rules: pure maths on components, one function per module kind.

Shapes: the real hidden state is ``[batch, seq, hidden]``; its decomposition is
``components`` of shape ``[C, batch, seq, hidden]`` with one component per position of the
sequence so far (``C = past + seq``), summing to the real hidden state. Every rule reads its
hyperparameters (eps, heads, scaling) from the module, never from a copy of the config.

Frozen factors (RMSNorm scales, attention probabilities, the SwiGLU gate) are computed from
the real hidden state and applied to every component alike, so each rule is linear in the
components and their sum follows the real computation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _offload
from .errors import DecompositionError

# Keep one chunk's intermediate tensors (e.g. the MLP's [chunk, batch, seq, intermediate])
# under this many elements, so memory follows the largest tensor kept, not C times it.
CHUNK_ELEMENTS = 1 << 26


def _linear(x: Tensor, layer: nn.Module) -> Tensor:
    """A bias-free ``nn.Linear`` applied to components in their own precision."""
    return F.linear(x, _offload.weight(layer).to(device=x.device, dtype=x.dtype))


@dataclass(frozen=True)
class Layout:
    """Which positions each component holds, when that is not "component i = position i".

    ``members``: ``[C, T]`` 0/1 matrix over the positions of the sequence (groups of
    positions, or a window ``c0:c1`` of single positions when components are processed in
    chunks); ``starts[c]``: the first position of component ``c``, before which it is
    exactly zero everywhere (nothing flows backwards in a causal model).
    """

    members: Tensor
    starts: tuple[int, ...]

    @staticmethod
    def of(members: Tensor) -> Layout:
        if members.dim() != 2 or bool((members.sum(0) > 1).any()):
            raise DecompositionError("component groups must not overlap")
        nonzero = members.bool()
        first = torch.where(nonzero.any(1), nonzero.float().argmax(1), members.shape[1])
        return Layout(members, tuple(int(i) for i in first.tolist()))

    def first(self, c0: int, c1: int) -> int:
        return min(self.starts[c0:c1], default=0)


def _first(layout: Layout | None, c0: int, c1: int) -> int:
    """The first position at which components ``c0:c1`` can be non-zero."""
    return c0 if layout is None else layout.first(c0, c1)


def _causal_chunks(
    fn: Callable[[int, int, int], Tensor],
    c: int,
    batch: int,
    q: int,
    offset: int,
    width: int,
    layout: Layout | None = None,
) -> Tensor:
    """Build a ``[c, batch, q, out]`` result from ``fn(c0, c1, t0)`` chunk by chunk.

    Component ``c`` is the token at sequence position ``c`` (or, with a ``layout``, starts at
    ``layout.starts[c]``): it is exactly zero at the positions of this call before that
    position minus ``offset`` (nothing flows backwards in a causal model).
    ``fn(c0, c1, t0)`` returns components ``c0:c1`` at positions ``t0:`` only; the rest stays
    zero. That skips the all-zero triangle of a prompt (about half the work), and chunks bound
    the memory of ``fn``'s intermediates (``width``: elements per component and position).
    """
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, width * batch * q))
    if q > 1:
        per_chunk = min(per_chunk, max(8, -(-c // 16)))
    if per_chunk >= c:
        return fn(0, c, 0)
    out: Tensor | None = None
    for c0 in range(0, c, per_chunk):
        c1 = min(c, c0 + per_chunk)
        t0 = min(max(0, _first(layout, c0, c1) - offset), q)
        part = fn(c0, c1, t0)
        if out is None:
            out = part.new_zeros((c, batch, q, part.shape[-1]))
        out[c0:c1, :, t0:] = part
    assert out is not None
    return out


def _positionwise(
    fn: Callable[[Tensor, int], Tensor], comps: Tensor, offset: int, width: int, layout: Layout | None = None
) -> Tensor:
    """:func:`_causal_chunks` for a position-wise ``fn(components, first_position)``."""
    c, batch, q = comps.shape[:3]
    return _causal_chunks(lambda c0, c1, t0: fn(comps[c0:c1, :, t0:], t0), c, batch, q, offset, width, layout)


@torch.no_grad()
def embedding(real: Tensor, offset: int, dtype: torch.dtype, layout: Layout | None = None) -> Tensor:
    """Token embeddings ``[batch, seq, hidden]`` -> components ``[offset+seq, batch, seq, hidden]``.

    Position ``j`` of this call is sequence position ``offset + j``: its embedding is that
    component's whole value there, every other component is zero. With a ``layout``
    (a whole sequence, no cache), component ``c`` holds the embeddings of its member positions.
    """
    batch, seq, hidden = real.shape
    if layout is not None:
        if offset or layout.members.shape[1] != seq:
            raise DecompositionError(
                f"component groups cover {layout.members.shape[1]} positions, the call has "
                f"{seq} (after {offset} cached): groups need the whole sequence in one call"
            )
        members = layout.members.to(device=real.device, dtype=dtype)
        return members[:, None, :, None] * real.to(dtype)[None]
    comps = real.new_zeros((offset + seq, batch, seq, hidden), dtype=dtype)
    pos = torch.arange(seq, device=real.device)
    comps[offset + pos, :, pos, :] = real.transpose(0, 1).to(dtype)
    return comps


@torch.no_grad()
def rms_norm(module: nn.Module, real: Tensor, comps: Tensor) -> Tensor:
    """``weight * x / rms(x)``: the scale ``1/rms`` comes from the real ``x``."""
    eps = float(module.variance_epsilon)  # type: ignore[arg-type]
    variance = real.to(torch.float32).pow(2).mean(-1, keepdim=True)
    weight = _offload.weight(module).to(comps.device)
    factor = torch.rsqrt(variance + eps).to(comps.dtype) * weight.to(comps.dtype)  # [B, q, hidden]
    return comps * factor


@torch.no_grad()
def mlp(module: nn.Module, real: Tensor, comps: Tensor, offset: int, layout: Layout | None = None) -> Tensor:
    """``down(act(gate(x)) * up(x))``: the gate ``act(gate(x))`` comes from the real ``x``."""
    gate = module.act_fn(module.gate_proj(real)).to(comps.dtype)  # type: ignore[operator]

    def rule(part: Tensor, t0: int) -> Tensor:
        return _linear(_linear(part, module.up_proj) * gate[:, t0:], module.down_proj)  # type: ignore[arg-type]

    return _positionwise(rule, comps, offset, 2 * gate.shape[-1], layout)


class ValueCache:
    """One layer's cache for decomposition: rotated keys and decomposed values.

    Buffers grow by doubling and are written in place, so a generation step costs what its
    own maths costs; nothing is re-padded or copied per step. Values are stored
    component-major, ``[C_cap, batch, kv_heads, S_cap, head_dim]`` (``C == S``: one component
    per position), so the first ``C`` components over the first ``S`` positions are a view.
    """

    def __init__(self, expected_length: int = 0) -> None:
        self.length = 0
        self.expected_length = expected_length
        self._keys: Tensor | None = None
        self._values: Tensor | None = None

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``keys [B, kv, q, hd]`` and ``values [C, B, kv, q, hd]``; return all of both."""
        q = keys.shape[2]
        end = self.length + q
        if values.shape[0] != end:
            raise DecompositionError(
                f"decomposed cache holds {self.length} positions but the new values have "
                f"{values.shape[0]} components for {q} new positions"
            )
        self._reserve(end, keys, values)
        assert self._keys is not None and self._values is not None
        self._keys[:, :, self.length : end] = keys
        self._values[:end, :, :, self.length : end] = values
        self.length = end
        return self._keys[:, :, :end], self._values[:end, :, :, :end]

    def _reserve(self, needed: int, keys: Tensor, values: Tensor) -> None:
        capacity = 0 if self._keys is None else self._keys.shape[2]
        if needed <= capacity:
            return
        # First to the expected length (a generate call knows it), then by a quarter: the
        # buffer is quadratic in length, so doubling would waste up to 3/4 of it.
        capacity = max(needed, self.expected_length, capacity + capacity // 4, 16)
        b, kv, _, hd = keys.shape
        new_keys = keys.new_empty((b, kv, capacity, hd))
        new_values = values.new_zeros((capacity, b, kv, capacity, hd))
        if self._keys is not None and self._values is not None:
            n = self.length
            new_keys[:, :, :n] = self._keys[:, :, :n]
            new_values[:n, :, :, :n] = self._values[:n, :, :, :n]
        self._keys, self._values = new_keys, new_values


def _rope(module: nn.Module) -> Callable[..., tuple[Tensor, Tensor]]:
    """The model's own ``apply_rotary_pos_emb`` (from the module that defines the class)."""
    return sys.modules[type(module).__module__].apply_rotary_pos_emb  # type: ignore[no-any-return]


def _additive_mask(mask: Tensor | None, batch: int, q: int, past: int, device: torch.device) -> Tensor:
    """The stock mask (None, bool or additive float) as an additive float32 ``[B, 1, q, S]``."""
    s = past + q
    neg = torch.finfo(torch.float32).min
    if mask is None:
        rows = torch.arange(q, device=device)[:, None] + past
        allowed = torch.arange(s, device=device)[None, :] <= rows
        return torch.where(allowed, 0.0, neg)[None, None].expand(batch, 1, q, s)
    if mask.shape[-1] != s or mask.shape[-2] != q:
        raise DecompositionError(
            f"attention mask of shape {tuple(mask.shape)} does not match {q} queries over {s} keys"
        )
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg)
    return mask.to(torch.float32).clamp(min=neg)


def attention_probs(
    module: nn.Module,
    real: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    mask: Tensor | None,
    cache: ValueCache | None,
    comps: Tensor,
    offset: int,
    layout: Layout | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention probabilities from the real ``x`` (``[B, kv, g, q, S]``) and the decomposed
    values ``[C, B, kv, S, hd]`` of every position so far."""
    batch, q, _ = real.shape
    hd = int(module.head_dim)  # type: ignore[arg-type]
    groups = int(module.num_key_value_groups)  # type: ignore[arg-type]
    queries = module.q_proj(real).view(batch, q, -1, hd).transpose(1, 2)  # type: ignore[operator]
    keys = module.k_proj(real).view(batch, q, -1, hd).transpose(1, 2)  # type: ignore[operator]
    cos, sin = position_embeddings
    queries, keys = _rope(module)(queries, keys, cos, sin)
    kv = keys.shape[1]
    values = _positionwise(lambda part, _: _linear(part, module.v_proj), comps, offset, kv * hd, layout)  # type: ignore[arg-type]
    values = values.view(comps.shape[0], batch, q, kv, hd).transpose(2, 3)
    if cache is not None:
        keys, values = cache.append(keys, values)
    queries = queries.to(torch.float32).reshape(batch, kv, groups * q, hd)
    scores = queries @ keys.to(torch.float32).transpose(-1, -2) * float(module.scaling)  # type: ignore[arg-type]
    scores = scores.view(batch, kv * groups, q, -1) + _additive_mask(mask, batch, q, offset, real.device)
    probs = torch.softmax(scores, dim=-1).view(batch, kv, groups, q, -1)
    return probs.to(comps.dtype), values


@torch.no_grad()
def attention(
    module: nn.Module,
    real: Tensor,
    comps: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    mask: Tensor | None,
    cache: ValueCache | None,
    offset: int,
    layout: Layout | None = None,
) -> Tensor:
    """``o(softmax(q k^T) v)``: probabilities from the real ``x``, values per component."""
    batch, q, _ = real.shape
    probs, values = attention_probs(module, real, position_embeddings, mask, cache, comps, offset, layout)
    c, _, kv, s, hd = values.shape
    groups = probs.shape[2]
    heads = kv * groups * hd

    if groups * q <= hd:
        # Few queries (generation steps): batch over components, reading the cache as a view.
        out = torch.matmul(probs.reshape(1, batch, kv, groups * q, s), values)  # [C, B, kv, g*q, hd]
        out = out.view(c, batch, kv, groups, q, hd).permute(0, 1, 4, 2, 3, 5).reshape(c, batch, q, heads)
        return _linear(out, module.o_proj)  # type: ignore[arg-type]

    def mix(c0: int, c1: int, t0: int) -> Tensor:
        # Many queries (a prompt): components go into the matrix columns, one big matmul.
        # Components c0:c1 have no value before key k0 and no output before query t0.
        n, rows, k0 = c1 - c0, q - t0, _first(layout, c0, c1)
        p = probs[:, :, :, t0:, k0:].reshape(batch, kv, groups * rows, s - k0)
        cols = values[c0:c1, :, :, k0:].permute(1, 2, 3, 0, 4).reshape(batch, kv, s - k0, n * hd)
        out = torch.matmul(p, cols).view(batch, kv, groups, rows, n, hd).permute(4, 0, 3, 1, 2, 5)
        return _linear(out.reshape(n, batch, rows, heads), module.o_proj)  # type: ignore[arg-type]

    return _causal_chunks(mix, c, batch, q, offset, 2 * heads, layout)
