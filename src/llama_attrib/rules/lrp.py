"""Target mode's attention under a rule set that credits queries and keys (:mod:`.sets`).

The family's own attention code runs with a graph (projections, rope, q/k norms), and the
attention function it calls becomes :func:`attend`: ``softmax(scores + mask) v`` whose
backward is the rule set's, not the plain gradient. With ``w_v``, ``w_q``, ``w_k`` the rule
set's fractions, ``g`` the output's cotangent, ``P`` the probabilities, ``z`` the scores
(after scaling and soft-cap, before the mask):

- values: ``w_v * P^T g``;
- scores: ``dP = g v^T``, ``dz = P * (dP - sum(P * dP))`` (the softmax's own Jacobian); a
  soft-cap ``c tanh(u / c)`` passes ``dz * z / u`` on (the identity rule);
- queries ``w_q * s dz k``, keys ``w_k * s dz^T q`` (``s``: the scaling).

What the output's relevance ``sum(g * out)`` does not pass on to queries, keys and values is
``(1 - w_v) sum(P * dP) - (w_q + w_k) sum(dz * z)``, the gradient of an extra input
(the ``unassigned`` leaf, of value 1), so that every rule set keeps an exact account.
The forward's value is the model's own attention implementation's; the backward computes the
probabilities block by block, as flash attention does; under ``vmap`` every target's
cotangent shares each block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .scores import FrozenProbabilities, Scratch, block_bytes
from .sets import Credited


@dataclass(frozen=True)
class Spec:
    """What one attention call needs besides its tensors: the mask, scaling and soft-cap the
    family's code gave the attention function, the model's own implementation's output (the
    forward's value), the rule, and bytes of probabilities computed at a time (None:
    :func:`block_bytes`)."""

    mask: Tensor | None
    scaling: float | None
    softcap: float | None
    output: Tensor  # the model's implementation's output [B, q, heads, hd]: the forward's value
    rule: Credited
    block: int | None = None
    sinks: Tensor | None = None  # GPT-OSS's attention sinks (a logit per head), detached


class _Attend(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, query: Tensor, key: Tensor, value: Tensor, unassigned: Tensor, spec: Spec
    ) -> Tensor:  # type: ignore[override]
        scaling = spec.scaling if spec.scaling is not None else float(query.shape[-1]) ** -0.5
        scores = FrozenProbabilities(
            query.detach(),
            key.detach(),
            spec.mask,
            float(scaling),
            spec.softcap,
            block=spec.block,
            sinks=spec.sinks,
        )
        ctx.scores, ctx.value, ctx.spec = scores, value.detach(), spec
        ctx.dtypes = (query.dtype, key.dtype, value.dtype, unassigned.dtype)
        return spec.output.to(value.dtype, copy=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        dq, dk, dv, du = _Pull.apply(grad, ctx.scores, ctx.value, ctx.spec, ctx.dtypes)
        return dq, dk, dv, du, None


class _Pull(torch.autograd.Function):
    """The rule set's backward of :class:`_Attend`, batched over targets under ``vmap``."""

    @staticmethod
    def forward(grad: Tensor, *args: Any) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(t[0] for t in _pull(grad[None], *args))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], grad: Tensor, *args: Any) -> tuple[Any, Any]:
        if in_dims[0] is None:
            return _Pull.forward(grad, *args), (None, None, None, None)
        return _pull(grad.movedim(in_dims[0], 0), *args), (0, 0, 0, 0)


def _pull(
    grad: Tensor, scores: FrozenProbabilities, value: Tensor, spec: Spec, dtypes: tuple[torch.dtype, ...]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``grad [n, B, q, heads, hd]`` (``n`` targets) -> the gradients of query
    ``[n, B, heads, q, d]``, key ``[n, B, kv, S, d]``, value ``[n, B, kv, S, hd]`` and the
    unassigned leaf ``[n, B, 1]``.

    Every product is one batched matrix product per (row, kv head), the targets merged into
    its rows or columns (never a broadcast, which would copy the probabilities or the keys
    once per target). The products accumulate into the gradients in place, and ``dP`` is
    written into one buffer that every block reuses, where it becomes ``dz``: on the CPU a
    fresh tensor of that size costs its page faults each time, about as long as the product
    that fills it (one layer of SmolLM2's shape at 8000 tokens, 8 targets: 30.4 s with fresh
    tensors, 14.1 s reusing them, on 2 cores). The cotangent's rows are copied into the
    layout each product needs one block at a time, never whole per target."""
    rules = spec.rule
    batch, kv, groups, q, s = scores.shape
    n, hd, d = grad.shape[0], value.shape[-1], scores.query.shape[-1]
    bk = batch * kv
    g = grad.to(torch.float32).reshape(n, batch, q, kv, groups, hd)  # each block takes its rows
    query = scores.query.to(torch.float32).reshape(batch, kv, groups, q, d)
    key = scores.key.to(torch.float32).reshape(bk, s, d)
    v = value.to(torch.float32).reshape(bk, s, hd)
    # a row of dz sums to 0 and one of P to 1: dz is the same from values shifted by any vector,
    # and dq from keys so shifted; shifted by their mean, the products add up terms of smaller
    # size (float32 rounding), and sum(P * dP) takes the shift's part back
    v_mean = v.mean(-2, keepdim=True)  # [B * kv, 1, hd]
    sinks = scores.sinks is not None  # a row of P sums to less than 1 (GPT-OSS): no shift cancels
    if sinks:
        v_mean = torch.zeros_like(v_mean)
    v, k_centred = v - v_mean, key if sinks else key - key.mean(-2, keepdim=True)
    credited = rules.query or rules.key
    dq = g.new_zeros((n, batch, kv, groups, q, d)) if rules.query else None  # the output's layout
    dk = g.new_zeros((bk * n, s, d))  # times rules.key * scaling at the end
    dv = g.new_zeros((bk, s, n * hd))
    du = g.new_zeros((batch, kv, n), dtype=torch.float64)
    path = rules.path > 0  # midpoints of the path from uniform attention, or the real scores
    # every target's dP (and, along a path, dz) is held for one block, beside the probabilities'
    # scores, masked scores and probabilities: twice the block bytes in all, since more rows per
    # block make the products faster (SmolLM2's shape at 8000 tokens, 2 targets: 5.0 s at one
    # block's bytes, 4.2 s at twice as many; blocks of more bytes gained no more)
    size = block_bytes(scores.query.device) if scores.block is None else scores.block
    blocks = replace(scores, block=max(1, 2 * size // ((2 if path else 1) * n + 3))).blocks(0, q)
    most = max((b - a) * k for a, b, k in blocks)
    scratch = Scratch(bk * groups * most)  # the probabilities', one block at a time
    buffer = g.new_empty((bk * n * groups * most if credited or rules.value != 1.0 else 0,))
    for a, b, k in blocks:
        r = b - a
        rows_g = g[:, :, a:b]  # [n, B, r, kv, groups, hd]
        # the scores before the mask only where a row may be fully masked (padding): elsewhere
        # a masked entry's dz is exactly 0 and its masked score finite
        z, masked, ratio, p = scores.scores(a, b, k, keep=scores.mask is not None, scratch=scratch)
        weights, share = p, rules.value
        if path:  # the values also take what uniform attention would give: P v = U v + (P - U) v
            visible = (masked > torch.finfo(torch.float32).min / 2).to(torch.float32)
            # a padding row sees no key: its uniform attention is zero, not 0/0 (it feeds nothing)
            uniform = visible / visible.sum(-1, keepdim=True).clamp(min=1.0)
            weights, share = rules.value * p + (1.0 - rules.value) * uniform, 1.0
        if share:
            rows = weights.reshape(bk, groups * r, k).transpose(-1, -2)
            by_row = rows_g.permute(1, 3, 4, 2, 0, 5).reshape(bk, groups * r, n * hd)  # dv's columns
            dv[:, :k].baddbmm_(rows, by_row, alpha=share)
        if rules.value == 1.0 and not credited:
            continue
        by_target = rows_g.permute(1, 3, 0, 4, 2, 5).reshape(bk, n * groups * r, hd)  # dP's rows
        dp = torch.bmm(
            by_target,
            v[:, :k].transpose(-1, -2),
            out=buffer[: bk * n * groups * r * k].view(bk, n * groups * r, k),
        ).view(batch, kv, n, groups, r, k)  # from centred values (the shift's part below)
        if path:
            # the scores' share is (P - U) dP, along the path alpha z from uniform attention
            # (alpha 0) to the real one (alpha 1): dz = mean over alpha of the softmax's Jacobian
            # at alpha z, applied to dP (midpoints); what the midpoints miss is unassigned
            kept = (dp * (p - uniform).unsqueeze(2)).sum((-3, -2, -1))  # the shift's part cancels
            du += (1.0 - rules.value) * kept.double()
            dz = torch.zeros_like(dp)
            for j in range(rules.path):
                at = torch.softmax(masked * ((j + 0.5) / rules.path), dim=-1).unsqueeze(2)
                step = dp * at
                dz += step.addcmul_(at, step.sum(-1, keepdim=True), value=-1.0)
            dz /= rules.path
            del dp, step, at
        else:
            dz = dp.mul_(p.unsqueeze(2))  # P * dP
            kept = dz.sum(-1, keepdim=True)  # sum(P * dP) per row and target
            if rules.value != 1.0:
                shift = (
                    by_target.view(batch, kv, n, groups * r, hd).sum(3) * v_mean.view(batch, kv, 1, hd)
                ).sum(-1)
                du += (1.0 - rules.value) * (kept.sum((-3, -2, -1)).double() + shift.double())
            if not credited:
                continue
            dz.addcmul_(p.unsqueeze(2), kept, value=-1.0)  # the softmax's Jacobian: P * (dP - sum(P * dP))
        del kept
        # sum(dz * z), each row's scores shifted by their largest (dz sums to 0 over a row, so
        # the sum is the same, without adding up large terms of opposite signs)
        shifted = (z if sinks else z.sub_(z.amax(-1, keepdim=True))).reshape(bk, groups * r * k, 1)
        flat = dz.view(bk, n, groups * r * k)
        du -= (rules.query + rules.key) * (flat @ shifted).view(batch, kv, n).double()
        if ratio is not None:
            dz.mul_(ratio.unsqueeze(2))
        if dq is not None:
            keys = k_centred if ratio is None else key  # a soft-capped row of dz sums to no constant
            part = dz.view(bk, n * groups * r, k) @ keys[:, :k]
            part = part.view(batch, kv, n, groups, r, d).permute(2, 0, 1, 3, 4, 5)
            dq[:, :, :, :, a:b] = part.mul_(rules.query * scores.scaling)
        if rules.key:
            mine = query[:, :, :, a:b].reshape(bk, 1, groups * r, d).expand(bk, n, groups * r, d)
            dk[:, :k].baddbmm_(
                dz.view(bk * n, groups * r, k).transpose(-1, -2), mine.reshape(bk * n, groups * r, d)
            )
        del dz
    heads = kv * groups
    if dq is None:
        dq_out = grad.new_zeros((n, batch, heads, q, d), dtype=dtypes[0])
    else:
        dq_out = dq.view(n, batch, heads, q, d).to(dtypes[0])
    dk.mul_(rules.key * scores.scaling)
    return (
        dq_out,
        dk.view(batch, kv, n, s, d).permute(2, 0, 1, 3, 4).to(dtypes[1]),
        dv.view(batch, kv, s, n, hd).permute(3, 0, 1, 2, 4).to(dtypes[2]),
        du.sum(1).T.reshape(n, batch, 1).to(dtypes[3]),
    )


def attend(query: Tensor, key: Tensor, value: Tensor, unassigned: Tensor, spec: Spec) -> Tensor:
    """``[B, q, heads, hd]``, as transformers' attention functions return it: the attention of
    ``query [B, heads, q, d]`` over ``key`` / ``value [B, kv, S, d]``, differentiated by the
    rule set (``unassigned``: a ``[B, 1]`` leaf of ones, whose gradient is that share)."""
    out: Tensor = _Attend.apply(query, key, value, unassigned, spec)
    return out
