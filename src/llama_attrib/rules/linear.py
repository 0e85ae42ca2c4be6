"""What every rule shares: linear maps as a family names them (:class:`Proj`), frozen
factors applied position by position (:func:`scale`), the embedding's components, and
forward mode's chunking of components (:func:`causal_chunks`).

A rule has two halves. Its *frozen factors* are computed from the real input (norm scales,
attention probabilities, the MLP's gate). Its *linear part* applies to whatever carries the
decomposition: forward mode's components ``[C, batch, q, hidden]`` (one component per
position of the sequence so far, summing to the real hidden state) or target mode's one
differentiable tensor ``[batch, q, hidden]`` (which equals the real input and requires grad).
Same code, any leading dimensions. Every rule reads its hyperparameters (eps, heads,
scaling) from the module, never from a copy of the config; biases are never applied to a
token: they go to the bias share (``residual``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _offload, quantized
from ..errors import DecompositionError, UnsupportedOptionError

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


def first_nonzero(layout: Layout | None, c0: int, c1: int) -> int:
    """The first position at which components ``c0:c1`` can be non-zero."""
    return c0 if layout is None else layout.first(c0, c1)


def causal_chunks(
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
        t0 = min(max(0, first_nonzero(layout, c0, c1) - offset), q)
        part = fn(c0, c1, t0)
        if out is None:
            out = part.new_zeros((c, batch, q, part.shape[-1]))
        out[c0:c1, :, t0:] = part
    assert out is not None
    return out


def positionwise(
    fn: Callable[[Tensor, int], Tensor], comps: Tensor, offset: int, width: int, layout: Layout | None = None
) -> Tensor:
    """:func:`causal_chunks` for a position-wise ``fn(components, first_position)``."""
    c, batch, q = comps.shape[:3]
    return causal_chunks(lambda c0, c1, t0: fn(comps[c0:c1, :, t0:], t0), c, batch, q, offset, width, layout)


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


@dataclass(frozen=True)
class Rounding:
    """Target mode's account of what a quantized layer's kernel rounds (:mod:`..quantized`):
    ``leaf(difference)`` adds the difference between the stock layer's output and its
    dequantized map, both on the real input (run in ``dtype``, the model's), as a leaf of the
    pass, so the backward gives it its own share."""

    dtype: torch.dtype
    leaf: Callable[[Tensor], Tensor]


_ROUNDING: ContextVar[Rounding | None] = ContextVar("rounding", default=None)


@contextmanager
def rounding(account: Rounding) -> Iterator[None]:
    """Quantized layers add what their kernel rounds through ``account`` for the block."""
    token = _ROUNDING.set(account)
    try:
        yield
    finally:
        _ROUNDING.reset(token)


# -- the rules: one per module kind, for both modes ---------------------------------------
#
# A rule has two halves. Its *frozen factors* are computed from the real input (norm scales,
# attention probabilities, the MLP's gate). Its *linear part* applies to whatever carries the
# decomposition: forward mode's components ``[C, batch, q, hidden]`` (chunk by chunk, see
# :func:`causal_chunks`) or target mode's one differentiable tensor ``[batch, q, hidden]``
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
        module = self.of(owner)
        w = _offload.weight(module)
        # a quantized Conv1D is a linear layer: bitsandbytes stores it [out, in]
        w = w.T if self.transposed and quantized.kind(module) is None else w
        return w if self.rows is None else w[self.rows(owner)]

    def bias(self, owner: nn.Module) -> Tensor | None:
        b = getattr(self.of(owner), "bias", None)
        if not isinstance(b, Tensor):
            return None
        b = b.detach()
        return b if self.rows is None else b[self.rows(owner)]

    def linear(self, owner: nn.Module, x: Tensor, t0: int = 0) -> Tensor:
        """The bias-free map, in ``x``'s precision and on its device (``t0``, the position ``x``
        starts at, matters to maps with frozen factors only). A quantized layer's is
        its dequantized weight's; in target mode, what its kernel rounds is added as a leaf of
        the pass (:func:`rounding`, measured on ``x``, which holds the real input there)."""
        y = F.linear(x, self.weight(owner).to(device=x.device, dtype=x.dtype))
        module = self.of(owner)
        if quantized.kind(module) is None:
            return y
        account = _ROUNDING.get()
        if account is None:
            if quantized.rounds(module):
                raise UnsupportedOptionError(
                    f"{type(module).__name__}: {quantized.rounding_reason(module)}, which forward "
                    "mode and flow() cannot account for: decompose in target mode (mode='target', "
                    "generate's decompose=True), which reports that rounding as its own share"
                )
            return y
        with torch.no_grad():
            stock = self.affine(owner, x.detach().to(account.dtype)).to(y)
            b = self.bias(owner)
            difference = stock - y.detach() - (0 if b is None else b.to(y))
        return y + account.leaf(difference)

    def affine(self, owner: nn.Module, x: Tensor) -> Tensor:
        """The map with its bias, as the stock module computes it (frozen factors): a
        quantized layer's own kernel."""
        module = self.of(owner)
        if quantized.kind(module) is not None:
            out: Tensor = module(x)
            return out if self.rows is None else out[..., self.rows(owner)]
        b = self.bias(owner)
        return F.linear(x, self.weight(owner).to(x), None if b is None else b.to(x))


def norm_eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float | int):
            return float(value)
    raise DecompositionError(f"{type(module).__name__} has no epsilon (variance_epsilon or eps)")


def scale(x: Tensor, factor: Tensor, t0: int = 0) -> Tensor:
    """A position-wise frozen factor applied to ``x`` (any leading dims) holding the positions
    ``t0 : t0 + x.shape[-2]``."""
    return x * factor[:, t0 : t0 + x.shape[-2]]
