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
Probabilities are computed block by block in the forward and again in the backward, as
flash attention does; under ``vmap`` every target's cotangent shares each block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .scores import FrozenProbabilities, block_bytes, mix
from .sets import RuleSet


@dataclass(frozen=True)
class Spec:
    """What one attention call needs besides its tensors: the mask, scaling and soft-cap the
    family's code gave the attention function, the rule set, and bytes of probabilities
    computed at a time (None: :func:`block_bytes`)."""

    mask: Tensor | None
    scaling: float | None
    softcap: float | None
    rules: RuleSet
    block: int | None = None


class _Attend(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, query: Tensor, key: Tensor, value: Tensor, unassigned: Tensor, spec: Spec
    ) -> Tensor:  # type: ignore[override]
        scaling = spec.scaling if spec.scaling is not None else float(query.shape[-1]) ** -0.5
        scores = FrozenProbabilities(
            query.detach(), key.detach(), spec.mask, float(scaling), spec.softcap, block=spec.block
        )
        batch, _, q, _ = query.shape
        v = value.detach().to(torch.float32)
        parts = [mix(scores.rows(a, b, k), v[..., :k, :]) for a, b, k in scores.blocks(0, q)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
        ctx.scores, ctx.value, ctx.spec = scores, value.detach(), spec
        ctx.dtypes = (query.dtype, key.dtype, value.dtype, unassigned.dtype)
        return out.view(batch, q, query.shape[1], value.shape[-1]).to(value.dtype)

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
    unassigned leaf ``[n, B, 1]``."""
    rules = spec.rules
    batch, kv, groups, q, s = scores.shape
    n, hd, d = grad.shape[0], value.shape[-1], scores.query.shape[-1]
    g = grad.to(torch.float32).reshape(n, batch, q, kv, groups, hd).permute(1, 3, 0, 4, 2, 5)
    query = scores.query.to(torch.float32).reshape(batch, kv, 1, groups, q, d)
    key = scores.key.to(torch.float32)
    v = value.to(torch.float32)
    dq = g.new_zeros((batch, kv, n, groups, q, d))
    dk = g.new_zeros((batch, kv, n, s, d))
    dv = g.new_zeros((batch, kv, n, s, hd))
    du = g.new_zeros((batch, kv, n))
    # every target's dP and dz are held for one block: blocks n + 1 times smaller
    size = block_bytes(scores.query.device) if scores.block is None else scores.block
    for a, b, k in replace(scores, block=max(1, size // (n + 1))).blocks(0, q):
        r = b - a
        z, ratio, p = scores.scores(a, b, k)  # [B, kv, groups, r, k]
        p = p.unsqueeze(2)  # [B, kv, 1, groups, r, k]
        gb = g[..., a:b, :]  # [B, kv, n, groups, r, hd]
        if rules.value:
            rows = p.reshape(batch, kv, 1, groups * r, k).transpose(-1, -2)
            dv[..., :k, :] += rules.value * (rows @ gb.reshape(batch, kv, n, groups * r, hd))
        dp = (gb @ v[:, :, None, None, :k].transpose(-1, -2)) * p  # P * dP
        kept = dp.sum(-1, keepdim=True)
        du += (1.0 - rules.value) * kept.sum((-3, -2, -1))
        if not (rules.query or rules.key):
            continue
        dz = dp - p * kept  # the softmax's Jacobian: P * (dP - sum(P * dP))
        del dp, kept
        du -= (rules.query + rules.key) * (dz * z.unsqueeze(2)).sum((-3, -2, -1))
        if ratio is not None:
            dz = dz * ratio.unsqueeze(2)
        dz = dz * scores.scaling
        if rules.query:
            dq[..., a:b, :] = rules.query * (dz @ key[:, :, None, None, :k])
        if rules.key:
            flat = dz.reshape(batch, kv, n, groups * r, k).transpose(-1, -2)
            dk[..., :k, :] += rules.key * (flat @ query[..., a:b, :].reshape(batch, kv, 1, groups * r, d))
    heads = kv * groups
    return (
        dq.permute(2, 0, 1, 3, 4, 5).reshape(n, batch, heads, q, d).to(dtypes[0]),
        dk.permute(2, 0, 1, 3, 4).to(dtypes[1]),
        dv.permute(2, 0, 1, 3, 4).to(dtypes[2]),
        du.sum(1).T.reshape(n, batch, 1).to(dtypes[3]),
    )


def attend(query: Tensor, key: Tensor, value: Tensor, unassigned: Tensor, spec: Spec) -> Tensor:
    """``[B, q, heads, hd]``, as transformers' attention functions return it: the attention of
    ``query [B, heads, q, d]`` over ``key`` / ``value [B, kv, S, d]``, differentiated by the
    rule set (``unassigned``: a ``[B, 1]`` leaf of ones, whose gradient is that share)."""
    out: Tensor = _Attend.apply(query, key, value, unassigned, spec)
    return out
