"""Faithfulness metrics: deletion and insertion curves, AOPC, comprehensiveness, sufficiency,
and the rank of a ground-truth source span.

A *removed* token is replaced by a fixed replacement token id (by default the tokenizer's
``unk`` token; for SmolLM2 that is ``<|endoftext|>``, the token that separates documents in
its training data). Replacing instead of deleting keeps every position, so all perturbed
copies of a prompt have the same length and run as one batch, and the position being
explained stays the same.

For one prefix ``ids`` ``[T]`` and target token, with an order of positions (most important
first) and fractions ``F`` (e.g. 0.05 ... 0.5), ``k(f) = ceil(f * T)`` tokens are:

- deletion curve: the top ``k`` positions replaced; point ``f`` is ``log p(target)``;
- insertion curve: every position replaced except the top ``k``;
- both curves also hold the end points ``f = 0`` and ``f = 1`` (full prompt / all replaced).

Then, with ``full = log p(target | ids)`` and ``none`` = all positions replaced:
``comprehensiveness(f) = full - deletion(f)`` (higher is better), ``sufficiency(f) = full -
insertion(f)`` (lower is better), ``AOPC_del = mean_f comprehensiveness(f)`` and
``AOPC_ins = mean_f (insertion(f) - none)`` (both higher is better).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LogProb = Callable[[Tensor], Tensor]  # ids [B, T] -> log p(target) [B]


def logprob_fn(model: nn.Module, target: int) -> LogProb:
    """``ids [B, T] -> log p(target)`` at the last position, ``[B]`` (no graph)."""

    def logprob(ids: Tensor) -> Tensor:
        with torch.no_grad():
            logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        out: Tensor = torch.log_softmax(logits, -1)[:, target]
        return out

    return logprob


def ranking(scores: Tensor) -> Tensor:
    """Positions from most to least important: descending score, ties by position (stable)."""
    return torch.sort(scores.detach().float(), descending=True, stable=True).indices


def drop_first(scores: Tensor) -> Tensor:
    """The scores with position 0 set below every other score, so it is ranked last."""
    out = scores.detach().clone().float()
    if len(out) > 1:
        out[0] = out[1:].min() - 1.0
    return out


def keep_counts(length: int, fractions: Sequence[float]) -> list[int]:
    """``ceil(f * length)`` for every fraction, at least 1 and at most ``length``."""
    return [min(length, max(1, math.ceil(f * length - 1e-9))) for f in fractions]


def perturbed(ids: Tensor, order: Tensor, fractions: Sequence[float], replacement: int) -> Tensor:
    """``[2 * len(fractions), T]``: the deletion copies, then the insertion copies."""
    rows = []
    for insert in (False, True):
        for k in keep_counts(len(ids), fractions):
            top = order[:k]
            row = torch.full_like(ids, replacement) if insert else ids.clone()
            row[top] = ids[top] if insert else replacement
            rows.append(row)
    return torch.stack(rows)


@dataclass
class Curves:
    """Deletion and insertion curves of one order; index 0 is ``f = 0``, the last ``f = 1``."""

    fractions: list[float]
    deletion: list[float]
    insertion: list[float]

    @property
    def full(self) -> float:
        return self.deletion[0]

    @property
    def none(self) -> float:
        return self.insertion[0]

    def comprehensiveness(self, fraction: float) -> float:
        return self.full - self.deletion[self.fractions.index(fraction)]

    def sufficiency(self, fraction: float) -> float:
        return self.full - self.insertion[self.fractions.index(fraction)]

    def aopc_deletion(self) -> float:
        inner = self.deletion[1:-1]
        return sum(self.full - d for d in inner) / len(inner)

    def aopc_insertion(self) -> float:
        inner = self.insertion[1:-1]
        return sum(i - self.none for i in inner) / len(inner)


def curves(
    logprob: LogProb,
    ids: Tensor,
    orders: dict[str, Tensor],
    fractions: Sequence[float],
    replacement: int,
    batch_size: int = 32,
) -> dict[str, Curves]:
    """Deletion and insertion curves of every order, from one batch of perturbed copies.

    ``fractions`` are the inner points (strictly between 0 and 1); ``ids`` is ``[T]``.
    """
    fractions = [float(f) for f in fractions]
    if not all(0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions must lie strictly between 0 and 1, got {fractions}")
    ends = torch.stack([ids, torch.full_like(ids, replacement)])
    batch = torch.cat([ends, *(perturbed(ids, o, fractions, replacement) for o in orders.values())])
    values = torch.cat([logprob(chunk) for chunk in batch.split(batch_size)]).tolist()
    full, none, n = values[0], values[1], len(fractions)
    out = {}
    for i, name in enumerate(orders):
        row = values[2 + 2 * n * i : 2 + 2 * n * (i + 1)]
        out[name] = Curves([0.0, *fractions, 1.0], [full, *row[:n], none], [none, *row[n:], full])
    return out


def span_rank(scores: Tensor, positions: Sequence[int]) -> int:
    """Rank (1 = best) of a source span: 1 + the number of positions outside it that score
    strictly higher than the span's best position."""
    if not positions:
        raise ValueError("span_rank needs at least one source position")
    inside = torch.zeros(len(scores), dtype=torch.bool)
    inside[list(positions)] = True
    best = scores[inside].max()
    return 1 + int((scores[~inside] > best).sum())
