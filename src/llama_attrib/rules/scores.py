"""The frozen attention probabilities, computed block by block from what the stock attention
function received (:class:`FrozenProbabilities`), and the sizes of those blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import DecompositionError

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
    if mask.shape[-1] > s and mask.shape[-2] == q:
        # a mask built for a longer cache than the keys (Granite 4.0's hybrid in 4.x): the keys'
        # columns, as the stock eager attention slices it
        mask = mask[..., :s]
    if mask.shape[-1] != s or mask.shape[-2] != q:
        raise DecompositionError(
            f"attention mask of shape {tuple(mask.shape)} does not match {q} queries over {s} keys"
        )
    mask = mask[..., t0:t1, :]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg)
    return mask.to(torch.float32).clamp(min=neg)


class Scratch:
    """Float32 buffers that blocks computed one after another reuse, one per name: on the CPU a
    fresh tensor of a block's size costs its page faults every time, often as long as the
    product that fills it (the probabilities' softmax took 4x as long into a new tensor as into
    a reused one at 8000 keys). Sized once for the largest block (``elements``)."""

    def __init__(self, elements: int) -> None:
        self.elements = elements
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """A tensor of ``shape`` over the buffer ``name`` (its last contents, or garbage)."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.device != device:
            buffer = torch.empty((max(size, self.elements),), dtype=torch.float32, device=device)
            self._buffers[name] = buffer
        return buffer[:size].view(shape)


@dataclass(frozen=True)
class FrozenProbabilities:
    """What the stock attention function received, enough for any rows of the frozen
    attention probabilities: ``query [B, heads, q, d]`` and ``key [B, kv, S, d]`` (rope and
    q/k norms applied), the family's mask (sliding window included), scaling and soft-cap.
    ``block``: bytes of probabilities computed at a time (default :func:`block_bytes`);
    ``keep``: a layer's probabilities up to this size are kept for the backward (default
    :data:`KEEP_BYTES`). A tight memory budget sets both lower (:class:`~llama_attrib.passes.TargetPass`)."""

    query: Tensor
    key: Tensor
    mask: Tensor | None
    scaling: float
    softcap: float | None
    block: int | None = None
    keep: int | None = None
    mixed: Tensor | None = None  # the stock attention's output [B, q, heads * hd], if it ran
    # GPT-OSS's attention sinks: a learned logit per head in each row's softmax, whose
    # probability mass goes to no value (so to no token)
    sinks: Tensor | None = None

    @staticmethod
    def of(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        mask: Tensor | None,
        scaling: float | None,
        softcap: float | None,
        sinks: Tensor | None = None,
    ) -> FrozenProbabilities:
        if scaling is None:
            scaling = float(query.shape[-1]) ** -0.5  # the attention functions' default
        sinks = None if sinks is None else sinks.detach()
        return FrozenProbabilities(query, key, mask, float(scaling), softcap, sinks=sinks)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(batch, kv heads, groups, queries, keys)``."""
        batch, heads, q, _ = self.query.shape
        kv, s = self.key.shape[1], self.key.shape[2]
        return batch, kv, heads // kv, q, s

    def rows(
        self, t0: int = 0, t1: int | None = None, keys: int | None = None, scratch: Scratch | None = None
    ) -> Tensor:
        """``[B, kv, groups, t1 - t0, keys]`` float32 probabilities of queries ``t0:t1`` over
        the first ``keys`` keys (default all; see :meth:`extent`); in ``scratch``'s buffers if
        given (valid until its next use)."""
        return self.scores(t0, t1, keys, keep=False, scratch=scratch)[3]

    def scores(
        self,
        t0: int = 0,
        t1: int | None = None,
        keys: int | None = None,
        keep: bool = True,
        scratch: Scratch | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """``(scores, masked, ratio, probabilities)`` of queries ``t0:t1`` over the first ``keys``
        keys, each ``[B, kv, groups, t1 - t0, keys]`` float32: the scores after scaling and
        soft-cap, before the mask and with it; with a soft-cap, ``ratio`` = capped / uncapped
        scores (the identity rule's factor; None without one); the probabilities (mask applied).
        ``keep=False``: only the probabilities are wanted (the scores are masked in place).
        ``scratch``: the scores, masked scores and probabilities go to its buffers (valid until
        its next use) rather than to new tensors."""
        batch, kv, groups, q, s = self.shape
        t1 = q if t1 is None else t1
        k1 = s if keys is None else keys
        rows, d = t1 - t0, self.query.shape[-1]
        shape = (batch, kv, groups, rows, k1)
        device = self.query.device

        def fresh(name: str) -> Tensor | None:  # None: new tensors, as autograd needs them
            return None if scratch is None else scratch.take(name, shape, device)

        query = self.query[:, :, t0:t1].to(torch.float32)
        if self.softcap is None:
            query = query * self.scaling  # on the queries: rows x d multiplications, not rows x keys
        query = query.reshape(batch * kv, groups * rows, d)
        key = self.key[:, :, :k1].to(torch.float32).reshape(batch * kv, k1, d).transpose(-1, -2)
        out = fresh("scores")
        scores = (
            query @ key if out is None else torch.bmm(query, key, out=out.view(batch * kv, -1, k1))
        ).view(shape)
        ratio = None
        if self.softcap is not None:
            uncapped = scores * self.scaling
            scores = torch.tanh(uncapped * (1.0 / self.softcap)) * self.softcap
            ratio = torch.where(uncapped == 0, 1.0, scores / torch.where(uncapped == 0, 1.0, uncapped))
        neg = torch.finfo(torch.float32).min
        if self.mask is None:
            # causal: of these rows' keys, only the last ``rows`` can be masked
            first = s - q + t0
            masked = scores
            if first < k1:
                seen = torch.ones((rows, k1 - first), dtype=torch.bool, device=scores.device).tril()
                if keep:
                    out = fresh("masked")
                    masked = scores.clone() if out is None else out.copy_(scores)
                masked[..., first:].masked_fill_(~seen, neg)
        else:
            mask = _additive_mask(self.mask, batch, q, s - q, self.query.device, t0, t1)[..., :k1]
            if keep:
                out = fresh("masked")
                masked = (
                    torch.add(scores, mask[:, :, None], out=out)
                    if out is not None
                    else scores + mask[:, :, None]
                )
            else:
                masked = scores.add_(mask[:, :, None])
        out = fresh("probabilities")
        if self.sinks is not None:  # the sink's column joins the softmax, then is dropped
            sink = self.sinks.to(device=device, dtype=torch.float32).view(1, kv, groups, 1, 1)
            probs = torch.softmax(torch.cat([masked, sink.expand(batch, kv, groups, rows, 1)], -1), -1)
            return scores, masked, ratio, probs[..., :-1] if out is None else out.copy_(probs[..., :-1])
        if out is None:
            return scores, masked, ratio, torch.softmax(masked, dim=-1)
        return scores, masked, ratio, torch.ops.aten._softmax.out(masked, -1, False, out=out)

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
