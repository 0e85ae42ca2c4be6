"""Target mode's attention kernels: the frozen mix of the values and its transpose, computing
the probabilities block by block (as flash attention does) and batching every target's
cotangent into one matrix product per block."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import scores as sizes
from .scores import FrozenProbabilities, Scratch, mix


class _FrozenMix(torch.autograd.Function):
    """``mix(probabilities, values)`` for queries ``t0:t1``, the probabilities frozen: computed
    block by block from the queries and keys in the forward and, unless they are small enough
    to keep (:attr:`FrozenProbabilities.keep`), again in the backward (as flash attention does)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, scores: FrozenProbabilities, t0: int, t1: int) -> Tensor:  # type: ignore[override]
        blocks = scores.blocks(t0, t1)
        limit = sizes.KEEP_BYTES if scores.keep is None else scores.keep
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
    grad: Tensor,
    scores: FrozenProbabilities,
    blocks: list[tuple[int, int, int]],
    length: int,
    kept: list[Tensor] | None,
) -> Tensor:
    """``grad [B, t1 - t0, heads * hd, n]`` (``n`` cotangents) for the queries of ``blocks``
    (:meth:`FrozenProbabilities.blocks`, from ``t0`` to ``t1``) -> ``[B, kv, length, hd, n]``."""
    batch, kv, groups, _, _ = scores.shape
    t0, t1 = blocks[0][0], blocks[-1][1]
    n = grad.shape[-1]
    g = grad.reshape(batch, t1 - t0, kv, groups, -1, n)
    hd = g.shape[4]
    total = grad.new_zeros((batch * kv, length, hd * n))
    scratch = Scratch(batch * kv * groups * max((b - a) * k for a, b, k in blocks))
    for i, (a, b, k) in enumerate(blocks):
        p = scores.rows(a, b, k, scratch) if kept is None else kept[i]
        p = p.to(grad.dtype).reshape(batch * kv, groups * (b - a), k)
        rows = g[:, a - t0 : b - t0].permute(0, 2, 3, 1, 4, 5).reshape(batch * kv, groups * (b - a), hd * n)
        total[:, :k].baddbmm_(p.transpose(-1, -2), rows)
    return total.view(batch, kv, length, hd, n)


def frozen_mix(scores: FrozenProbabilities, values: Tensor, t0: int = 0, t1: int | None = None) -> Tensor:
    """``[B, t1 - t0, heads * hd]``: queries ``t0:t1`` mixing ``values [B, kv, S, hd]`` with
    the frozen probabilities, which are never held for more than one block of queries."""
    t1 = scores.shape[3] if t1 is None else t1
    out: Tensor = _FrozenMix.apply(values, scores, t0, t1)
    return out
