"""What a step explains: a :class:`Target`.

A target is a linear read-out of the final hidden state (after the final norm): a direction
per row of the batch, and the value it gives in the step's logits. Every engine pulls a
target's read-out back through the layers, every Composition explains a target on demand
(``c.explain(target)``), and every sum is checked against the target's value in the stock
model's own logits. The kinds:

- :class:`Token`: one token's logit (``c[token]``);
- :class:`Contrast`: ``logit_a - logit_b`` (``c.contrast(a, b)``);
- :class:`LogProb`: the logit minus the probability-weighted mean logit, the probabilities
  frozen (``c.logprob(token)``; it equals ``log p + H(p)``);
- :class:`Vector`: any direction of the hidden state (no logit value: never checked).

A target holds one value per row of a batch (``Token((5, 9))``: token 5 in row 0, 9 in row 1);
a single id stands for one row (``Token(5)``). A new kind is one class here: its fields (tuples
of ids, one per row), :meth:`Target.readout` and :meth:`Target.value`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import UnsupportedOptionError

Ids = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Head:
    """The LM head as a target reads it: ``weight [vocab, hidden]`` (shared, not copied), the
    dtype its rows are read in, and whether a final soft-cap follows it."""

    weight: Tensor
    dtype: torch.dtype
    softcapped: bool = False

    def rows(self, ids: Ids) -> Tensor:
        """``[len(ids), hidden]``: the head's rows, each converted before any arithmetic."""
        return self.weight[list(ids)].detach().to(self.dtype)


def _ids(value: Any) -> Ids:
    """One id (one row) or a sequence of ids (one per row) -> a tuple of ints."""
    if hasattr(value, "tolist"):  # a tensor or a numpy array
        value = value.tolist()
    if isinstance(value, Sequence):
        return tuple(int(v) for v in value)
    return (int(value),)


class Target:
    """What one step explains, for each row of a batch (see the module's docstring).

    Subclasses are frozen dataclasses whose fields are tuples of ids, one per row; they are
    hashable and compare by value, so a one-row target is the key of what was computed for it.
    """

    explains_logits = True  # False where the target has no value in the logits (Vector)

    def readout(self, head: Head, logits: Tensor) -> Tensor:
        """``[rows, hidden]``: each row's read-out direction, in ``head.dtype``. ``logits``:
        the step's stock logits ``[rows, vocab]`` (before a final soft-cap)."""
        raise NotImplementedError

    def value(self, logits: Tensor) -> Tensor:
        """``[rows]``: what the target is in the step's logits ``[rows, vocab]``."""
        raise NotImplementedError

    @property
    def rows(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))  # type: ignore[arg-type]

    def row(self, r: int) -> Target:
        """This target for row ``r`` alone."""
        return self._map(lambda ids: (ids[r],))

    def broadcast(self, rows: int) -> Target:
        """This target for ``rows`` rows: a one-row target repeated, else itself (checked)."""
        if self.rows == rows:
            return self
        if self.rows != 1:
            raise UnsupportedOptionError(f"{self!r} has {self.rows} rows, the batch {rows}")
        return self._map(lambda ids: ids * rows)

    def _map(self, change: Callable[[Ids], Ids]) -> Target:
        """This target with ``change`` applied to each of its per-row fields."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return dataclasses.replace(self, **{f.name: change(getattr(self, f.name)) for f in fields})  # type: ignore[type-var]


@dataclass(frozen=True)
class Token(Target):
    """One token's logit per row."""

    ids: Ids

    def __init__(self, ids: int | Sequence[int] | Tensor) -> None:
        object.__setattr__(self, "ids", _ids(ids))

    def readout(self, head: Head, logits: Tensor) -> Tensor:
        return head.rows(self.ids)

    def value(self, logits: Tensor) -> Tensor:
        return logits[torch.arange(len(self.ids)), list(self.ids)]


@dataclass(frozen=True)
class Contrast(Target):
    """``logit_a - logit_b`` per row."""

    a: Ids
    b: Ids

    def __init__(self, a: int | Sequence[int] | Tensor, b: int | Sequence[int] | Tensor) -> None:
        a, b = _ids(a), _ids(b)
        if len(a) != len(b):
            a, b = (a * len(b), b) if len(a) == 1 else (a, b * len(a))
        if len(a) != len(b):
            raise UnsupportedOptionError(f"a contrast of {len(a)} first ids and {len(b)} second ids")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    def readout(self, head: Head, logits: Tensor) -> Tensor:
        return head.rows(self.a) - head.rows(self.b)

    def value(self, logits: Tensor) -> Tensor:
        rows = torch.arange(len(self.a))
        return logits[rows, list(self.a)] - logits[rows, list(self.b)]


@dataclass(frozen=True)
class LogProb(Target):
    """The log-probability target per row: the token's logit minus the probability-weighted
    mean logit, ``z_t - sum_j p_j z_j``, the probabilities ``p`` frozen from the stock logits.
    Exact and linear; it equals ``log p_t + H(p)``. Not linear under a final soft-cap: refused
    there. Computed in float64 (over SmolLM2's 49152 tokens a float32 softmax sums to 1 + 8e-6,
    and the float32 product ``p @ W`` is off by 7e-5 of its largest entry)."""

    ids: Ids

    def __init__(self, ids: int | Sequence[int] | Tensor) -> None:
        object.__setattr__(self, "ids", _ids(ids))

    def readout(self, head: Head, logits: Tensor) -> Tensor:
        if head.softcapped:
            raise UnsupportedOptionError(
                "the log-probability target of a model with a final soft-cap is not linear in the "
                "hidden state: explain the logit (before the cap) instead"
            )
        weight = head.weight.detach()
        out = []
        for row, token in enumerate(self.ids):
            p = torch.softmax(logits[row].double(), -1).to(weight.device)
            mean = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
            for start in range(0, weight.shape[0], 4096):  # never the whole head in float64 at once
                mean += p[start : start + 4096] @ weight[start : start + 4096].double()
            out.append((weight[token].double() - mean).float().to(head.dtype))
        return torch.stack(out)

    def value(self, logits: Tensor) -> Tensor:
        z = logits.double()
        own = z[torch.arange(len(self.ids)), list(self.ids)]
        return (own - (torch.softmax(z, -1) * z).sum(-1)).float()


@dataclass(frozen=True, eq=False)
class Vector(Target):
    """Any direction of the final hidden state, ``[rows, hidden]``: its components are those of
    the hidden state along it. It has no value in the logits, so its sum is not checked."""

    vectors: Tensor
    explains_logits = False

    def readout(self, head: Head, logits: Tensor) -> Tensor:
        return self.vectors

    def value(self, logits: Tensor) -> Tensor:
        raise UnsupportedOptionError("a Vector target has no value in the logits")

    def row(self, r: int) -> Target:
        return Vector(self.vectors[r : r + 1])

    def broadcast(self, rows: int) -> Target:
        if self.rows == rows:
            return self
        if self.rows != 1:
            raise UnsupportedOptionError(f"a Vector target of {self.rows} rows for a batch of {rows}")
        return Vector(self.vectors.expand(rows, -1))


def of(value: Any) -> Target | None:
    """One target from what a user writes: a Target, a token id, a pair ``(a, b)`` of ids (or
    of per-row ids), or None (the default: each row's argmax, resolved by the engine)."""
    if value is None or isinstance(value, Target):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return Contrast(*value)
    return Token(value)


def per_step(targets: Any, next_tokens: Tensor | None, steps: int, batch: int) -> list[Target] | None:
    """Each step's target from ``decompose_sequence``'s ``targets`` (None: the next token of
    the sequence, ``next_tokens [B, steps]``, or each row's argmax without them; ``"logprob"``:
    the next token's log-probability target; a token id, one per step or ``[batch, steps]``;
    a pair ``(a, b)`` of those; a Target for every step; or a list of Targets, one per step)."""
    if isinstance(targets, Target):
        return [targets.broadcast(batch)] * steps
    if isinstance(targets, list) and targets and all(isinstance(t, Target) for t in targets):
        if len(targets) != steps:
            raise UnsupportedOptionError(f"targets: {len(targets)} targets for {steps} steps")
        return [t.broadcast(batch) for t in targets]
    if isinstance(targets, str):
        if targets != "logprob":
            raise UnsupportedOptionError(f"targets={targets!r}: the one named target is 'logprob'")
        if next_tokens is None:
            raise UnsupportedOptionError(
                "targets='logprob' explains the next token of each step: give prompt_length"
            )
        return [LogProb(ids) for ids in _ids_per_step(next_tokens, steps, batch, "targets")]
    if targets is None:
        if next_tokens is None:
            return None
        return [Token(ids) for ids in _ids_per_step(next_tokens, steps, batch, "targets")]
    if isinstance(targets, tuple) and len(targets) == 2:
        a = _ids_per_step(targets[0], steps, batch, "targets[0]")
        b = _ids_per_step(targets[1], steps, batch, "targets[1]")
        return [Contrast(x, y) for x, y in zip(a, b, strict=True)]
    return [Token(ids) for ids in _ids_per_step(targets, steps, batch, "targets")]


def _ids_per_step(value: Any, steps: int, batch: int, what: str) -> list[Ids]:
    """A token id, one per step, or ``[batch, steps]`` ids -> per step, one id per row."""
    t = torch.as_tensor(value)
    if t.dim() == 0:
        return [(int(t),) * batch] * steps
    if t.dim() == 1:
        if t.shape[0] != steps:
            raise UnsupportedOptionError(f"{what}: {t.shape[0]} ids for {steps} steps")
        return [(int(v),) * batch for v in t.tolist()]
    if tuple(t.shape) != (batch, steps):
        raise UnsupportedOptionError(f"{what}: shape {tuple(t.shape)}, expected ({batch}, {steps})")
    return [tuple(int(v) for v in t[:, k].tolist()) for k in range(steps)]


__all__ = ["Contrast", "Head", "LogProb", "Target", "Token", "Vector", "of", "per_step"]
