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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _compat, _offload
from .errors import DecompositionError

# Keep one chunk's intermediate tensors (e.g. the MLP's [chunk, batch, seq, intermediate])
# under this many elements, so memory follows the largest tensor kept, not C times it.
CHUNK_ELEMENTS = 1 << 26


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


def _additive_mask(
    mask: Tensor | None,
    batch: int,
    q: int,
    past: int,
    device: torch.device,
    t0: int = 0,
    t1: int | None = None,
) -> Tensor:
    """Rows ``t0:t1`` of the stock mask (None, bool or additive float) as an additive float32
    ``[B, 1, rows, S]``."""
    t1 = q if t1 is None else t1
    s = past + q
    neg = torch.finfo(torch.float32).min
    if mask is None:
        rows = torch.arange(t0, t1, device=device)[:, None] + past
        allowed = torch.arange(s, device=device)[None, :] <= rows
        return torch.where(allowed, 0.0, neg)[None, None].expand(batch, 1, t1 - t0, s)
    if mask.shape[-1] != s or mask.shape[-2] != q:
        raise DecompositionError(
            f"attention mask of shape {tuple(mask.shape)} does not match {q} queries over {s} keys"
        )
    mask = mask[..., t0:t1, :]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg)
    return mask.to(torch.float32).clamp(min=neg)


# -- the rules: one per module kind, for both modes ---------------------------------------
#
# A rule has two halves. Its *frozen factors* are computed from the real input (norm scales,
# attention probabilities, the MLP's gate). Its *linear part* applies to whatever carries the
# decomposition: forward mode's components ``[C, batch, q, hidden]`` (chunk by chunk, see
# :func:`_causal_chunks`) or target mode's one differentiable tensor ``[batch, q, hidden]``
# (which equals the real input and requires grad). Same code, any leading dimensions.
# Biases are never applied to a token: they go to the bias share (``residual``).


@dataclass(frozen=True)
class Proj:
    """A linear map of a module, as a family names it: the ``nn.Linear`` at ``attr``, or
    some of its output rows (``rows(owner)``: a slice or an index tensor, for a fused
    projection such as Phi-3's qkv or GPT-NeoX's per-head interleaved one). ``transposed``:
    the weight is stored ``[in, out]`` (GPT-2's ``Conv1D``)."""

    attr: str
    rows: Callable[[nn.Module], slice | Tensor] | None = None
    transposed: bool = False

    def of(self, owner: nn.Module) -> nn.Module:
        return owner.get_submodule(self.attr)

    def weight(self, owner: nn.Module) -> Tensor:
        """``[out, in]``, as ``F.linear`` takes it."""
        w = _offload.weight(self.of(owner))
        w = w.T if self.transposed else w
        return w if self.rows is None else w[self.rows(owner)]

    def bias(self, owner: nn.Module) -> Tensor | None:
        b = getattr(self.of(owner), "bias", None)
        if not isinstance(b, Tensor):
            return None
        b = b.detach()
        return b if self.rows is None else b[self.rows(owner)]

    def linear(self, owner: nn.Module, x: Tensor) -> Tensor:
        """The bias-free map, in ``x``'s precision and on its device."""
        return F.linear(x, self.weight(owner).to(device=x.device, dtype=x.dtype))

    def affine(self, owner: nn.Module, x: Tensor) -> Tensor:
        """The map with its bias, as the stock module computes it (frozen factors)."""
        b = self.bias(owner)
        return F.linear(x, self.weight(owner).to(x), None if b is None else b.to(x))


def _eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float | int):
            return float(value)
    raise DecompositionError(f"{type(module).__name__} has no epsilon (variance_epsilon or eps)")


@dataclass(frozen=True)
class RMSNorm:
    """``x * (offset + weight) / rms(x)``, the scale frozen: ``x * factor``. ``offset`` is 1
    for the norms that scale by ``1 + weight`` (Gemma)."""

    offset: float = 0.0

    @torch.no_grad()
    def factor(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Tensor:
        """``[B, q, hidden]``: ``(offset + weight) / rms(real)``."""
        variance = real.to(torch.float32).pow(2).mean(-1, keepdim=True)
        weight = _offload.weight(module).to(device=real.device, dtype=torch.float32) + self.offset
        return (torch.rsqrt(variance + _eps(module)) * weight).to(dtype)

    def apply(self, factor: Tensor, x: Tensor, t0: int = 0) -> Tensor:
        return scale(x, factor, t0)

    def bias(self, module: nn.Module) -> Tensor | None:
        return None


@dataclass(frozen=True)
class LayerNorm:
    """``(x - mean(x)) * weight / std(x) + bias``: the centring is linear (each component is
    centred), the scale ``weight / std(real)`` is the frozen factor, the bias a bias share."""

    @torch.no_grad()
    def factor(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Tensor:
        """``[B, q, hidden]``: ``weight / sqrt(var(real) + eps)``."""
        variance = real.to(torch.float32).var(-1, unbiased=False, keepdim=True)
        weight = getattr(module, "weight", None)
        inverse = torch.rsqrt(variance + _eps(module))
        if weight is None:
            return inverse.expand(real.shape).to(dtype)
        return (inverse * _offload.weight(module).to(device=real.device, dtype=torch.float32)).to(dtype)

    def apply(self, factor: Tensor, x: Tensor, t0: int = 0) -> Tensor:
        return scale(x - x.mean(-1, keepdim=True), factor, t0)

    def bias(self, module: nn.Module) -> Tensor | None:
        b = getattr(module, "bias", None)
        return b.detach() if isinstance(b, Tensor) else None

    def read(self, factor: Tensor, vector: Tensor) -> Tensor:
        """The transpose of :meth:`apply` on a read-out ``vector``."""
        v = vector * factor
        return v - v.mean(-1, keepdim=True)


Norm = RMSNorm | LayerNorm


def norm_read(rule: Norm, factor: Tensor, vector: Tensor) -> Tensor:
    """What a read-out ``vector`` of a norm's output reads of its input (the linear part's
    transpose): ``vector * factor``, centred for a LayerNorm."""
    return rule.read(factor, vector) if isinstance(rule, LayerNorm) else vector * factor


def scale(x: Tensor, factor: Tensor, t0: int = 0) -> Tensor:
    """A position-wise frozen factor applied to ``x`` (any leading dims) holding the positions
    ``t0 : t0 + x.shape[-2]``."""
    return x * factor[:, t0 : t0 + x.shape[-2]]


@dataclass(frozen=True)
class GatedMLP:
    """``down(act(gate(x)) * up(x))`` with the gate ``act(gate(x))`` frozen."""

    gate: Proj
    up: Proj
    down: Proj
    act: str = "act_fn"

    @torch.no_grad()
    def factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Tensor:
        act: Callable[[Tensor], Tensor] = getattr(module, self.act)
        return act(self.gate.affine(module, real)).to(dtype)

    def apply(self, module: nn.Module, gate: Tensor, x: Tensor, t0: int = 0) -> Tensor:
        return self.down.linear(module, scale(self.up.linear(module, x), gate, t0))

    def bias(self, module: nn.Module, gate: Tensor) -> Tensor | None:
        """The output's bias share ``down(gate * b_up) + b_down`` (None without biases)."""
        b_up, b_down = self.up.bias(module), self.down.bias(module)
        if b_up is None and b_down is None:
            return None
        out = gate.new_zeros((*gate.shape[:-1], self.down.weight(module).shape[0]))
        if b_up is not None:
            out = out + self.down.linear(module, gate * b_up.to(gate))
        return out if b_down is None else out + b_down.to(out)

    def width(self, module: nn.Module) -> int:
        return 2 * int(self.up.weight(module).shape[0])


@dataclass(frozen=True)
class MLP:
    """``down(act(up(x)))`` without a gate (GPT-2, GPT-NeoX): ``act(z)`` is ``z * (act(z) / z)``
    with the ratio frozen (for the GELU, exactly ``Phi(z)``); ``up``'s bias reaches the output
    through the frozen ratio, as the bias share."""

    up: Proj
    down: Proj
    act: str = "act"

    @torch.no_grad()
    def factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> Tensor:
        act: Callable[[Tensor], Tensor] = getattr(module, self.act)
        z = self.up.affine(module, real).to(torch.float32)
        # at z = 0 the ratio is its limit, the activation's slope there (a centred difference)
        tiny = torch.full_like(z, 1e-4)
        slope = (act(tiny) - act(-tiny)) / (2 * tiny)
        ratio = torch.where(z == 0, slope, act(z) / torch.where(z == 0, tiny, z))
        return ratio.to(dtype)

    def apply(self, module: nn.Module, ratio: Tensor, x: Tensor, t0: int = 0) -> Tensor:
        return self.down.linear(module, scale(self.up.linear(module, x), ratio, t0))

    def bias(self, module: nn.Module, ratio: Tensor) -> Tensor | None:
        """The output's bias share ``down(ratio * b_up) + b_down`` (None without biases)."""
        b_up, b_down = self.up.bias(module), self.down.bias(module)
        if b_up is None and b_down is None:
            return None
        out = ratio.new_zeros((*ratio.shape[:-1], self.down.weight(module).shape[0]))
        if b_up is not None:
            out = out + self.down.linear(module, ratio * b_up.to(ratio))
        return out if b_down is None else out + b_down.to(out)

    def width(self, module: nn.Module) -> int:
        return 2 * int(self.up.weight(module).shape[0])


Expert = tuple[Tensor, Tensor, Tensor]  # one expert's gate, up and down weights
SHARED = -1  # the key of a shared expert's factor (Qwen2-MoE), beside the routed experts'


@dataclass(frozen=True)
class SparseMoE:
    """``sum_e w_e * down_e(act(gate_e(x)) * up_e(x))`` over the experts the router chose,
    plus, where the block has one, a shared expert ``sigmoid(g(x)) * down(act(gate(x)) * up(x))``.

    The routing weights ``w_e`` (zero for an expert not chosen at a position), the shared
    expert's sigmoid gate and each expert's ``act(gate(x))`` are frozen factors. The block is
    read through :mod:`llama_attrib._compat` (its layout differs between transformers versions);
    ``expert_names``: a 4.x expert MLP's gate, up and down attributes; ``shared`` /
    ``shared_gate``: the shared expert MLP and its gate's attributes, if any.
    """

    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str | None = None
    shared_gate: str | None = None

    def experts(self, module: nn.Module) -> list[Expert]:
        return _compat.moe_experts(module, self.expert_names)

    def _shared(self, module: nn.Module) -> tuple[nn.Module, GatedMLP] | None:
        if self.shared is None:
            return None
        rule = GatedMLP(Proj("gate_proj"), Proj("up_proj"), Proj("down_proj"))
        return module.get_submodule(self.shared), rule

    @torch.no_grad()
    def factors(self, module: nn.Module, real: Tensor, dtype: torch.dtype) -> dict[int, Tensor]:
        """Per expert used anywhere: ``w_e * act(gate_e(real))``, ``[B, q, intermediate]``."""
        batch, q, d = real.shape
        weights, chosen = _compat.moe_route(module, real.reshape(-1, d))
        act = _compat.moe_activation(module)
        out = {}
        for e, (gate, _, _) in enumerate(self.experts(module)):
            w = (weights * (chosen == e)).sum(-1).view(batch, q, 1)
            if bool((w != 0).any()):
                out[e] = (act(F.linear(real, gate.to(real))) * w.to(real)).to(dtype)
        if (shared := self._shared(module)) is not None:
            mlp, rule = shared
            gate = torch.sigmoid(Proj(str(self.shared_gate)).affine(module, real))
            out[SHARED] = (rule.factors(mlp, real, dtype) * gate.to(dtype)).to(dtype)
        return out

    def apply(self, module: nn.Module, gates: dict[int, Tensor], x: Tensor, t0: int = 0) -> Tensor:
        experts = self.experts(module)
        total: Tensor | None = None
        for e, gate in gates.items():
            if e == SHARED:
                mlp, rule = self._shared(module)  # type: ignore[misc]
                part = rule.apply(mlp, gate, x, t0)
            else:
                _, up, down = experts[e]
                part = F.linear(scale(F.linear(x, up.to(x)), gate, t0), down.to(x))
            total = part if total is None else total + part
        return x * 0 if total is None else total

    def bias(self, module: nn.Module, gates: dict[int, Tensor]) -> Tensor | None:
        return None

    def width(self, module: nn.Module) -> int:
        return 2 * int(self.experts(module)[0][1].shape[0])

    def returns_router_logits(self, module: nn.Module) -> bool:
        return _compat.moe_returns_router_logits(module)


@dataclass(frozen=True)
class Attention:
    """``out(probs @ value(x))``: probabilities frozen (from the stock attention function,
    after the family's rope, q/k norms, scaling, mask, sliding window and soft-cap)."""

    value: Proj = Proj("v_proj")
    out: Proj = Proj("o_proj")


# Target mode applies a position-wise rule (the MLP) to this many positions at a time: the
# backward then holds the ``[targets, positions, intermediate]`` temporaries of one piece.
ROWS = 1024

# Target mode computes the probabilities of this many bytes (float32) at a time, so a long
# prompt never holds a layer's ``heads x q x S`` matrix at once.
BLOCK_BYTES = 32 << 20
# On an accelerator, blocks this large: there kernel launches, not bytes, bound small blocks
# (32 MiB is 8 query rows of a 32-head model at 32k tokens, 4096 blocks a layer).
DEVICE_BLOCK_BYTES = 1 << 30
# The smallest blocks a tight memory budget gets (memory.target_layouts).
MIN_BLOCK_BYTES = 1 << 20
# A layer's probabilities up to this size are kept from the forward for the backward (else
# computed again there, block by block).
KEEP_BYTES = 128 << 20


def block_bytes(device: torch.device) -> int:
    """Bytes of probabilities target mode computes at a time on ``device``."""
    return BLOCK_BYTES if device.type == "cpu" else max(BLOCK_BYTES, DEVICE_BLOCK_BYTES)


@dataclass(frozen=True)
class Scores:
    """What the stock attention function received, enough for any rows of the frozen
    attention probabilities: ``query [B, heads, q, d]`` and ``key [B, kv, S, d]`` (rope and
    q/k norms applied), the family's mask (sliding window included), scaling and soft-cap.
    ``block``: bytes of probabilities computed at a time (default :func:`block_bytes`);
    ``keep``: a layer's probabilities up to this size are kept for the backward (default
    :data:`KEEP_BYTES`). A tight memory budget sets both lower (:class:`session.Call`)."""

    query: Tensor
    key: Tensor
    mask: Tensor | None
    scaling: float
    softcap: float | None
    block: int | None = None
    keep: int | None = None
    mixed: Tensor | None = None  # the stock attention's output [B, q, heads * hd], if it ran

    @staticmethod
    def of(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        mask: Tensor | None,
        scaling: float | None,
        softcap: float | None,
    ) -> Scores:
        if scaling is None:
            scaling = float(query.shape[-1]) ** -0.5  # the attention functions' default
        return Scores(query, key, mask, float(scaling), softcap)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(batch, kv heads, groups, queries, keys)``."""
        batch, heads, q, _ = self.query.shape
        kv, s = self.key.shape[1], self.key.shape[2]
        return batch, kv, heads // kv, q, s

    def rows(self, t0: int = 0, t1: int | None = None, keys: int | None = None) -> Tensor:
        """``[B, kv, groups, t1 - t0, keys]`` float32 probabilities of queries ``t0:t1`` over
        the first ``keys`` keys (default all; see :meth:`extent`)."""
        batch, kv, groups, q, s = self.shape
        t1 = q if t1 is None else t1
        k1 = s if keys is None else keys
        rows, d = t1 - t0, self.query.shape[-1]
        query = self.query[:, :, t0:t1].to(torch.float32)
        if self.softcap is None:
            query = query * self.scaling  # on the queries: rows x d multiplications, not rows x keys
        query = query.reshape(batch, kv, groups * rows, d)
        scores = (query @ self.key[:, :, :k1].to(torch.float32).transpose(-1, -2)).view(
            batch, kv, groups, rows, k1
        )
        if self.softcap is not None:
            scores = torch.tanh(scores * (self.scaling / self.softcap)) * self.softcap
        neg = torch.finfo(torch.float32).min
        if self.mask is None:
            # causal: of these rows' keys, only the last ``rows`` can be masked
            first = s - q + t0
            if first < k1:
                seen = torch.ones((rows, k1 - first), dtype=torch.bool, device=scores.device).tril()
                scores[..., first:].masked_fill_(~seen, neg)
        else:
            mask = _additive_mask(self.mask, batch, q, s - q, self.query.device, t0, t1)[..., :k1]
            scores += mask[:, :, None]
        return torch.softmax(scores, dim=-1)

    def extent(self, t0: int, t1: int) -> int:
        """How many keys queries ``t0:t1`` see: the keys after the last one any of them sees
        get probability exactly zero (a causal mask), so :meth:`rows` may leave them out."""
        batch, _, _, q, s = self.shape
        if self.mask is None:
            return s - q + t1
        mask = _additive_mask(self.mask, batch, q, s - q, self.query.device, t0, t1)
        seen = (mask > torch.finfo(torch.float32).min / 2).flatten(0, -2).any(0)
        return int(seen.nonzero().max()) + 1 if bool(seen.any()) else s

    def blocks(self, t0: int, t1: int) -> list[tuple[int, int, int]]:
        """Queries ``t0:t1`` in blocks of about :func:`block_bytes` of probabilities:
        ``(first, end, keys seen)`` each."""
        batch, kv, groups, _, s = self.shape
        size = block_bytes(self.query.device) if self.block is None else self.block
        rows = max(1, size // (4 * batch * kv * groups * s))
        return [(a, min(t1, a + rows), self.extent(a, min(t1, a + rows))) for a in range(t0, t1, rows)]


def mix(probs: Tensor, values: Tensor) -> Tensor:
    """``probs [B, kv, g, rows, S]`` times ``values [..., B, kv, S, hd]`` -> ``[..., B, rows, heads*hd]``."""
    b, kv, g, rows, s = probs.shape
    out = torch.matmul(probs.reshape(b, kv, g * rows, s), values)  # [..., B, kv, g*rows, hd]
    lead, hd = out.shape[:-4], out.shape[-1]
    out = out.view(*lead, b, kv, g, rows, hd).movedim(-2, -4)  # [..., B, rows, kv, g, hd]
    return out.reshape(*lead, b, rows, kv * g * hd)


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
    values = _positionwise(lambda part, _: rule.value.linear(module, part), comps, offset, kv * hd, layout)
    values = _value_heads(values, hd)  # [C, B, kv, q, hd]
    b_v = rule.value.bias(module)
    res_values = None
    if residual is not None or b_v is not None:
        res = (
            comps.new_zeros((batch, q, kv * hd)) if residual is None else rule.value.linear(module, residual)
        )
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
        n, rows, k0 = c1 - c0, q - t0, _first(layout, c0, c1)
        p = probs[:, :, :, t0:, k0:].reshape(batch, kv, groups * rows, s - k0)
        cols = values[c0:c1, :, :, k0:].permute(1, 2, 3, 0, 4).reshape(batch, kv, s - k0, n * hd)
        out = torch.matmul(p, cols).view(batch, kv, groups, rows, n, hd).permute(4, 0, 3, 1, 2, 5)
        return rule.out.linear(module, out.reshape(n, batch, rows, heads))

    return _causal_chunks(part, c, batch, q, offset, 2 * heads, layout), res_out


class _FrozenMix(torch.autograd.Function):
    """``mix(probabilities, values)`` for queries ``t0:t1``, the probabilities frozen: computed
    block by block from the queries and keys in the forward and, unless they are small enough
    to keep (:attr:`Scores.keep`), again in the backward (as flash attention does)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, scores: Scores, t0: int, t1: int) -> Tensor:  # type: ignore[override]
        blocks = scores.blocks(t0, t1)
        limit = KEEP_BYTES if scores.keep is None else scores.keep
        batch, kv, groups, _, _ = scores.shape
        whole = sum((b - a) * k for a, b, k in blocks) * batch * kv * groups * 4
        if scores.mixed is not None and whole > limit:
            # the stock implementation's output is this map's value; the backward computes the
            # probabilities block by block, as it would have to anyway
            ctx.scores, ctx.blocks, ctx.length, ctx.kept = scores, blocks, values.shape[-2], None
            return scores.mixed[:, t0:t1].to(values.dtype, copy=True)
        kept: list[Tensor] | None = []
        parts = []
        size = 0
        for a, b, k in blocks:
            p = scores.rows(a, b, k)
            parts.append(mix(p.to(values.dtype), values[..., :k, :]))
            size += p.numel() * p.element_size()
            kept = kept if kept is not None and size <= limit else None
            if kept is not None:
                kept.append(p)
        ctx.scores, ctx.blocks, ctx.length, ctx.kept = scores, blocks, values.shape[-2], kept
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        out: Tensor = _Transposed.apply(grad, ctx.scores, ctx.blocks, ctx.length, ctx.kept)
        ctx.kept = None
        return out, None, None, None


class _Transposed(torch.autograd.Function):
    """The backward of :class:`_FrozenMix`: ``probabilities^T @ grad``. Under ``vmap`` (one
    cotangent per target) the targets become columns of one matrix product per block, so each
    block of probabilities is computed once and read once for all of them."""

    @staticmethod
    def forward(grad: Tensor, *args: Any) -> Tensor:  # type: ignore[override]
        return _transposed(grad.unsqueeze(-1), *args).squeeze(-1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], grad: Tensor, *args: Any) -> tuple[Tensor, int | None]:
        if in_dims[0] is None:
            return _Transposed.forward(grad, *args), None
        return _transposed(grad.movedim(in_dims[0], -1), *args), 4


def _transposed(
    grad: Tensor, scores: Scores, blocks: list[tuple[int, int, int]], length: int, kept: list[Tensor] | None
) -> Tensor:
    """``grad [B, t1 - t0, heads * hd, n]`` (``n`` cotangents) for the queries of ``blocks``
    (:meth:`Scores.blocks`, from ``t0`` to ``t1``) -> ``[B, kv, length, hd, n]``."""
    batch, kv, groups, _, _ = scores.shape
    t0, t1 = blocks[0][0], blocks[-1][1]
    n = grad.shape[-1]
    g = grad.reshape(batch, t1 - t0, kv, groups, -1, n)
    hd = g.shape[4]
    total = grad.new_zeros((batch * kv, length, hd * n))
    for i, (a, b, k) in enumerate(blocks):
        p = scores.rows(a, b, k) if kept is None else kept[i]
        p = p.to(grad.dtype).reshape(batch * kv, groups * (b - a), k)
        rows = g[:, a - t0 : b - t0].permute(0, 2, 3, 1, 4, 5).reshape(batch * kv, groups * (b - a), hd * n)
        total[:, :k].baddbmm_(p.transpose(-1, -2), rows)
    return total.view(batch, kv, length, hd, n)


def frozen_mix(scores: Scores, values: Tensor, t0: int = 0, t1: int | None = None) -> Tensor:
    """``[B, t1 - t0, heads * hd]``: queries ``t0:t1`` mixing ``values [B, kv, S, hd]`` with
    the frozen probabilities, which are never held for more than one block of queries."""
    t1 = scores.shape[3] if t1 is None else t1
    out: Tensor = _FrozenMix.apply(values, scores, t0, t1)
    return out


def attention_graph(
    rule: Attention,
    module: nn.Module,
    hd: int,
    scores: Scores,
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
    values = rule.value.linear(module, x)
    b_v = rule.value.bias(module)
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
