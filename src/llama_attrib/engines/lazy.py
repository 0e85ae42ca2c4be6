"""Target mode's Compositions: one step's logits as components, each token's computed on
demand by its run (a :class:`Run`: :class:`.target.TargetRun`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import pydec
import torch
from torch import Tensor, nn

from ..composition import SHARES, Contributions, LazyComposition, softcapped
from ..errors import DecompositionError
from ..families import Family
from ..targets import Head, Target, Token, Vector


class Run(Protocol):
    """What a Composition reads of the pass that made it (:class:`.target.TargetRun`)."""

    model: nn.Module
    family: Family
    weight: Tensor
    head: Head
    dtype: torch.dtype
    names: tuple[str, ...] | None
    logits: Tensor | None

    @property
    def batch(self) -> int: ...

    @property
    def tolerance(self) -> float: ...

    def stock_logits(self) -> Tensor: ...

    def component_count(self, step: int) -> int: ...

    def solve(self, requests: Sequence[Any]) -> Tensor: ...


class TargetComposition(LazyComposition):
    """One step's logits ``[*batch, vocab]`` as components, computed per target on demand.

    ``c[token].components`` (``c[row, token]`` for a batch) costs nothing for the step's
    target (computed with every other step's in one batched backward) and one more pass for
    any other token. ``c.recovery`` is the step's real logits, which the components of any
    token add up to (checked for the target). ``c.hidden`` and ``c.components`` (the whole
    vocabulary) are exact too but cost one backward per hidden dimension: use forward mode
    (``mode="forward"``) when you need them for many steps.
    """

    def __init__(self, run: Run, step: int) -> None:
        self._run = run
        self._step = step
        self._known: dict[tuple[int, Target], Tensor] = {}  # (row, one-row target) -> [C + shares]
        self._hidden: Tensor | None = None
        self.target: pydec.Composition | None = None  # the step's target's components
        self.target_key: Target | None = None  # and the target itself (every row's)
        self.names = run.names

    def _materialise(self) -> Tensor:
        weight = self._run.weight.detach().to(device=self.hidden.device, dtype=self.dtype)
        return torch.matmul(self.hidden, weight.T)

    @property
    def _squeeze(self) -> bool:
        return self._run.batch == 1

    @property
    def logits(self) -> Tensor:
        """The real logits of this step, ``[*batch, vocab]``."""
        assert self._run.logits is not None
        logits = self._run.logits[:, self._step]
        return logits[0] if self._squeeze else logits

    @property
    def capped(self) -> Tensor | None:
        """The step's logits after the model's final soft-cap (Gemma 2), which the components
        do not add up to (they explain the logits before it); None without a soft-cap."""
        cap = self._run.family.final_softcap(self._run.model)
        return None if cap is None else softcapped(self.logits, cap)

    @property
    def recovery(self) -> Tensor:
        """What the components add up to: the step's real logits."""
        return self.logits

    @property
    def shape(self) -> torch.Size:
        vocab = int(self._run.weight.shape[0])
        return torch.Size((vocab,) if self._squeeze else (self._run.batch, vocab))

    @property
    def dtype(self) -> torch.dtype:
        return self._run.dtype

    @property
    def device(self) -> torch.device:
        return self._run.weight.device

    def numc(self) -> int:
        return self._run.component_count(self._step)

    @property
    def hidden(self) -> Tensor:
        """The decomposed final hidden state ``[C, *batch, hidden]``: one backward per dimension."""
        if self._hidden is None:
            d = int(self._run.weight.shape[1])
            eye = torch.eye(d, dtype=self.dtype, device=self.device)
            requests = [(self._step, Vector(eye[j].expand(self._run.batch, d))) for j in range(d)]
            solved = self._run.solve(requests)[..., : self.numc()]  # [d, B, C] (shares left out)
            hidden = solved.permute(2, 1, 0)
            self._hidden = hidden[:, 0] if self._squeeze else hidden
        return self._hidden

    def _remember(self, target: Target, contributions: Tensor) -> None:
        """Store ``contributions [B, C_all + len(SHARES)]`` (the shares of no token last) of
        every row of ``target``."""
        for row in range(self._run.batch):
            self._known[(row, target.row(row))] = _keep(contributions[row], self.numc())

    def _lookup(self, target: Target, row: int = 0) -> Contributions:
        return self._composition(self._known[(row, target.row(row))])

    def _composition(self, components: Tensor) -> Contributions:
        return Contributions.of(components[: -len(SHARES)], shares=components[-len(SHARES) :])

    def explain(self, target: Target, row: int = 0) -> Contributions:
        """Components of a one-row target at batch row ``row``: computed with the step's
        target, or one more pass (remembered)."""
        if target.rows != 1:
            raise ValueError(f"explain takes a one-row target and a row, not {target!r}")
        found = self._known.get((row, target))
        if found is None:
            run = self._run
            vector = target.readout(run.head, run.stock_logits()[row : row + 1, self._step])[0]
            cot = vector.new_zeros((run.batch, vector.shape[0]))
            cot[row] = vector
            found = _keep(run.solve([(self._step, Vector(cot))])[0, row], self.numc())
            self._known[(row, target)] = found
        return self._composition(found)

    def __getitem__(self, indices: Any) -> pydec.Composition:
        """``c[token]`` (or ``c[row, token]``) from a backward pass, not the full tensor."""
        parsed = None if pydec.is_c_accessing_enabled() else _parse_index(indices, self._squeeze)
        if parsed is not None and ((parsed[0], Token(parsed[1])) in self._known or self._full is None):
            return self.explain(Token(parsed[1]), parsed[0])
        return super().__getitem__(indices)

    def check(self) -> None:
        """Every known target's components and shares of no token (bias, rounding, unassigned)
        add up to its value in the stock model's own logits (a plain forward, not the
        decomposition's pass), else :class:`DecompositionError`."""
        logits = self._run.stock_logits()[:, self._step]
        tol = self._run.tolerance
        for (row, target), comps in self._known.items():
            value = target.value(logits[row : row + 1])[0]
            if not bool(torch.isfinite(logits[row]).all()):
                raise DecompositionError(
                    f"step {self._step}: the model's own logits are not finite (NaN or inf): the model "
                    "itself overflows on this input (try float32 or bfloat16 instead of float16)"
                )
            scale = float(logits[row].abs().max().clamp(min=1e-30))
            total = float(comps.sum())
            err = abs(total - float(value)) / scale
            if not err <= tol:
                raise DecompositionError(
                    f"step {self._step}: contributions and shares of no token add up to {total:.6g}, "
                    f"the model's logit is {float(value):.6g} (relative error {err:.2e} > {tol:.0e}); "
                    "an operation outside llama_attrib's rules changed the hidden state"
                )

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"TargetComposition(size={tuple(self.shape)}, components={self.numc()}, "
            f"dtype={self.dtype}, step={self._step})"
        )


def _keep(contributions: Tensor, count: int) -> Tensor:
    """The first ``count`` components and the shares of no token (the last columns)."""
    return torch.cat([contributions[:count], contributions[-len(SHARES) :]])


def _parse_index(indices: Any, squeeze: bool) -> tuple[int, int] | None:
    """``(row, token)`` from ``c[token]`` / ``c[row, token]`` with integer indices, else None."""
    if not isinstance(indices, tuple):
        indices = (indices,)
    wanted = 1 if squeeze else 2
    if len(indices) != wanted:
        return None
    values = []
    for i in indices:
        if isinstance(i, Tensor) and i.dim() == 0 and not i.is_floating_point():
            i = int(i)
        if not isinstance(i, int) or isinstance(i, bool):
            return None
        values.append(i)
    return (0, values[0]) if squeeze else (values[0], values[1])
