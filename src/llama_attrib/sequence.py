"""Decompose a finished sequence in one pass: every step's decomposition at once.

Two modes give the same numbers (tested to 1e-5 in float32):

- ``"target"``: a stock forward, then the chosen target logits of every step pulled back
  through one layer at a time in batched backwards (:mod:`sweep`). The contribution of
  position ``i`` is ``grad_i . h_i`` at the first layer's input. Memory does not grow with
  the number of components; other tokens' contributions are computed on demand (one more
  pass each time, batched per request).
- ``"forward"``: components carried forward through every layer (:mod:`rules`), in chunks
  of components sized to the memory budget. Gives the whole decomposed hidden state, so
  every token of the vocabulary is one dot product away.

Both accept component groups: one component per named span of positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pydec
import torch
from torch import Tensor, nn

from . import families, memory, sweep
from .checks import completeness_error, tolerance
from .composition import Contributions, LazyComposition, LogitComposition
from .errors import DecompositionError, UnsupportedOptionError
from .passes import CapturePass, ForwardPass, TargetPass
from .rules import Layout
from .session import Session

MODES = ("target", "forward")

Span = tuple[int, int]
Groups = Mapping[str, Span | Sequence[Span]] | Sequence[Span] | Tensor


@dataclass(frozen=True)
class Inputs:
    """A teacher-forced pass: ids ``[B, T]``, mask, position ids, and the positions explained."""

    ids: Tensor
    mask: Tensor | None
    position_ids: Tensor | None
    positions: list[int]
    last: Tensor | None = None  # right padding: each row's last real position (one step)

    @property
    def first(self) -> int:
        """The first position explained (the last layer's outputs before it are not read)."""
        return self.positions[0] if self.last is None else int(self.last.min())

    def call(self, model: nn.Module) -> Any:
        kwargs: dict[str, Any] = {"use_cache": False, "decompose": False}
        kwargs["logits_to_keep"] = self.ids.shape[1] - self.first
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        return model(input_ids=self.ids, **kwargs)

    @property
    def kept(self) -> Tensor:
        """Index of each explained position among the logits kept."""
        return torch.tensor(self.positions) - self.positions[0]

    def select(self, t: Tensor, dim: int = 0) -> Tensor:
        """``t[..., B, T_kept, ...]`` (batch at ``dim``) -> the explained positions ``[..., B, K, ...]``."""
        if self.last is None:
            return t.index_select(dim + 1, self.kept.to(t.device))
        index = (self.last - int(self.last.min())).to(t.device)
        rows = torch.arange(t.shape[dim], device=t.device)
        moved = t.movedim((dim, dim + 1), (0, 1))[rows, index]  # [B, ...]
        return moved.unsqueeze(1).movedim((0, 1), (dim, dim + 1))


Scope = Callable[[], AbstractContextManager[Session]]


def explain(
    model: nn.Module,
    scope: Scope,
    inputs: Inputs,
    *,
    mode: str = "target",
    targets: list[Any] | None = None,
    members: Tensor | None = None,
    names: tuple[str, ...] | None = None,
    component_dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    reference: Tensor | None = None,
    also: Sequence[tuple[int, Any]] = (),
    replay: list[Tensor] | None = None,
) -> tuple[pydec.Composition, ...]:
    """The per-step Compositions of one teacher-forced pass (see
    :func:`llama_attrib.decompose_sequence`). ``scope()``: a block in which the model is wrapped,
    giving its session (target mode's lazy Compositions enter it again later). ``also``: more
    target-mode requests solved with the targets (:meth:`TargetRun.compositions`). ``replay``:
    the layers' outputs generate computed (:class:`sweep.Capture`), for target mode's first pass."""
    if mode == "forward":
        dtype = component_dtype or families.component_dtype(model)
        limit = memory.budget(max_memory, next(model.parameters()).device)
        with scope() as session:
            return _forward_mode(model, session, inputs, members, names, dtype, limit, progress)
    run = TargetRun.of(model, scope, inputs, members, names, component_dtype, max_memory, progress)
    if reference is not None:
        # generate's own logits: what it chose each token from (a full forward can break a
        # near tie the other way), and what the components are checked against
        run.reference = reference.float()
        run.logits = reference.to(run.dtype)
    run.replay = replay
    return run.compositions(targets, also)


# -- target mode ------------------------------------------------------------------------


class TargetRun:
    """The frozen-factor pass of one sequence, and batched backward passes through it."""

    def __init__(
        self,
        model: nn.Module,
        scope: Scope,
        inputs: Inputs,
        members: Tensor | None,
        names: tuple[str, ...] | None,
        dtype: torch.dtype,
        budget: int,
        progress: bool | None,
        lean: bool = False,
    ) -> None:
        self.model = model
        self.scope = scope
        self.inputs = inputs
        self.members = members
        self.names = names
        self.dtype = dtype
        self.budget = budget
        self.lean = lean
        self.progress = progress
        self.model_dtype = next(model.parameters()).dtype
        batch, length = inputs.ids.shape
        layouts = memory.target_layouts(
            memory.Shape.of(model), batch, length, dtype, inputs.ids.device, self.model_dtype
        )
        # the probability blocks each fit the budget with one target at least, largest first
        self.layouts = [(s, p) for s, p in layouts if s.graph + s.per_request <= budget]
        if not self.layouts:
            smallest = layouts[-1][0]
            raise memory.MemoryBudgetError(
                f"target mode over {batch} x {length} tokens needs about "
                f"{memory.fmt(smallest.graph + smallest.per_request)} for one target; the budget is "
                f"{memory.fmt(budget)}. Shorten the sequence, decompose fewer rows at once, or raise "
                "max_memory"
            )
        self.logits: Tensor | None = None
        self.reference: Tensor | None = None  # the stock logits, once computed
        # generate's own hidden states, for the first pass only (a later one records its own)
        self.replay: list[Tensor] | None = None
        self.family = families.family_of(model)
        self.weight: Tensor = self.family.head_weight(model)

    @staticmethod
    def of(
        model: nn.Module,
        scope: Scope,
        inputs: Inputs,
        members: Tensor | None,
        names: tuple[str, ...] | None,
        component_dtype: torch.dtype | None,
        max_memory: int | str | None,
        progress: bool | None,
    ) -> TargetRun:
        """A run with the default component dtype and the budget of ``max_memory``."""
        dtype = component_dtype or families.component_dtype(model)
        limit = memory.budget(max_memory, next(model.parameters()).device)
        lean = max_memory is None
        return TargetRun(model, scope, inputs, members, names, dtype, limit, progress, lean=lean)

    @property
    def batch(self) -> int:
        return int(self.inputs.ids.shape[0])

    @property
    def tolerance(self) -> float:
        """How far a sum of components may be from the stock logit it explains: a
        half-precision model's own logit carries its rounding, whatever the components' dtype."""
        half = self.model_dtype in (torch.float16, torch.bfloat16)
        return tolerance(self.model_dtype if half else self.dtype)

    def head_row(self, token: int) -> Tensor:
        return self.weight[token].detach().to(self.dtype)

    def _pass(self, probabilities: tuple[int, int] | None) -> TargetPass:
        return TargetPass(self.dtype, keep_from=self.inputs.first, probabilities=probabilities)

    def stock_logits(self) -> Tensor:
        """The stock model's own logits at the explained positions (before a final soft-cap),
        which the components and residual are checked against: generate's, or those of the
        stock forward the first :meth:`solve` records."""
        assert self.reference is not None, "the stock logits are known once a pass has run"
        return self.reference

    def layout(self, n: int) -> tuple[memory.TargetSizes, tuple[int, int] | None]:
        """The sizes and probability blocks for ``n`` targets: the default blocks, unless
        smaller ones (none kept for the backward) leave room for the targets in fewer sweeps
        over the layers. Each sweep runs every layer again; smaller blocks cost little."""

        def sweeps(sizes: memory.TargetSizes) -> int:
            return math.ceil(n / sizes.chunks(n, self.budget, self.lean)[1])

        return min(self.layouts, key=lambda layout: sweeps(layout[0]))  # the first, of equals

    def chunks(self, n: int) -> tuple[int, int]:
        """``(targets per batched backward, targets per sweep)`` (:meth:`memory.TargetSizes.chunks`)."""
        return self.layout(n)[0].chunks(n, self.budget, self.lean)

    def solve(self, requests: Sequence[tuple[int, Any] | list[tuple[int, Any]]]) -> Tensor:
        """Contributions ``[N, B, C + 1]`` for each ``(step, target key)`` request: one per
        component, then the bias share (pydec's residual: what belongs to no token). A request
        that is a list of such pairs is their sum, pulled back as one target.

        Keys: ``("token", ids per row)``, ``("contrast", a per row, b per row)``,
        ``("vector", [B, hidden])`` or ``None`` (each row's argmax token at that step).
        """
        n = len(requests)
        per_chunk, per_sweep = self.chunks(n)
        probabilities = self.layout(n)[1]
        layers = len(self.family.layers(self.model))
        sweeps = math.ceil(n / per_sweep)
        results: list[Tensor] = []
        with torch.inference_mode(False), self.scope() as session:
            # the stock forward, whose hidden states the layers' frozen factors are computed from
            replay, self.replay = self.replay, None
            recorded = sweep.record(
                self.model, session, CapturePass(self.dtype), lambda: self.inputs.call(self.model), replay
            )
            stock = self.inputs.select(recorded.logits)
            if self.reference is None:
                self.reference = stock.float()
            if self.logits is None:
                self.logits = stock.to(self.dtype)
            norm = self.family.final_norm(self.model)
            first = self.inputs.first

            def head(x: Tensor) -> Tensor:
                return self.inputs.select(norm(x)[:, first:])

            values = recorded.first_input.detach().to(self.dtype)
            steps = len(self.inputs.positions)
            work = n * values.shape[1] * self.batch
            bar = _progress(self.progress, sweeps * (layers + 1), "layer", work=work)
            for start in range(0, n, per_sweep):
                part = requests[start : start + per_sweep]
                cot = values.new_zeros((len(part), self.batch, steps, values.shape[-1]))
                for i, request in enumerate(part):
                    for step, key in request if isinstance(request, list) else [request]:
                        if not 0 <= step < steps:
                            raise IndexError(f"step {step} out of range ({steps} steps)")
                        cot[i, :, step] += self._cotangent(self.resolve(step, key)).to(cot)
                grads, shares = sweep.pull_back(
                    session,
                    recorded,
                    lambda: self._pass(probabilities),
                    head,
                    list(cot.split(per_chunk)),
                    bar.update,
                )
                for g, share in zip(grads, shares, strict=True):
                    contributions = (g * values).sum(-1)  # [n, B, T]
                    if self.members is not None:
                        contributions = contributions @ self.members.to(contributions).T
                    results.append(torch.cat([contributions, share[..., None]], -1).detach())
            bar.close()
        return torch.cat(results)

    def components(self, step: int) -> int:
        """How many components step ``step`` has: its position + 1, or the number of groups."""
        if self.members is not None:
            return int(self.members.shape[0])
        return self.inputs.positions[step] + 1

    def compositions(
        self, targets: list[Any] | None, also: Sequence[tuple[int, Any]] = ()
    ) -> tuple[TargetComposition, ...]:
        """One Composition per step, its target (default each row's argmax) solved; ``also``:
        more ``(step, key)`` requests solved in the same pass and remembered by their steps."""
        steps = len(self.inputs.positions)
        wanted = targets if targets is not None else [None] * steps
        solved = self.solve([*enumerate(wanted), *also])
        out = []
        for step, (target, contributions) in enumerate(zip(wanted, solved[:steps], strict=True)):
            c = TargetComposition(self, step)
            key = self.resolve(step, target)
            c._remember(key, contributions)
            c.target = c._lookup(key)
            c.target_key = key
            out.append(c)
        for (step, key), contributions in zip(also, solved[steps:], strict=True):
            out[step]._remember(self.resolve(step, key), contributions)
        for c in out:
            c.check()
        return tuple(out)

    def answer(self, targets: list[Any] | None) -> Tensor:
        """Contributions ``[B, C_all + 1]`` to the sum over steps of each step's target logit
        (``targets``, default each row's argmax), pulled back as one target: the sum over steps
        of what :meth:`compositions` gives (a step's components beyond its position are zero),
        at the cost of one target. Checked against the sum of the stock model's logits."""
        steps = len(self.inputs.positions)
        wanted = targets if targets is not None else [None] * steps
        keys = [self.resolve(step, key) for step, key in enumerate(wanted)]
        if any(key[0] not in ("token", "contrast") for key in keys):
            raise UnsupportedOptionError("an answer's targets are token ids or (a, b) pairs")
        out: Tensor = self.solve([list(enumerate(wanted))])[0]
        logits = self.stock_logits()
        for row in range(self.batch):
            value = sum(float(_logit(logits[row, step], _what(key, row))) for step, key in enumerate(keys))
            scale = sum(float(logits[row, step].abs().max()) for step in range(len(keys)))
            total = float(out[row].sum())
            if not abs(total - value) <= self.tolerance * max(scale, 1e-30):
                raise DecompositionError(
                    f"row {row}: contributions and bias share add up to {total:.6g}, the sum of the "
                    f"model's logits is {value:.6g}; an operation outside llama_attrib's rules changed "
                    "the hidden state"
                )
        return out

    def resolve(self, step: int, key: Any) -> Any:
        """``None`` -> ``("token", each row's argmax at that step)``; other keys unchanged."""
        if key is not None:
            return key
        assert self.logits is not None, "logits are known once the pass has run"
        return ("token", tuple(int(t) for t in self.logits[:, step].argmax(-1).tolist()))

    def _cotangent(self, key: Any) -> Tensor:
        """``[B, hidden]``: each row's head-weight row (or difference of two) for ``key``."""
        kind = key[0]
        if kind == "token":
            return torch.stack([self.head_row(t) for t in key[1]])
        if kind == "contrast":
            return torch.stack(
                [self.head_row(a) - self.head_row(b) for a, b in zip(key[1], key[2], strict=True)]
            )
        if kind == "vector":
            vector: Tensor = key[1]
            return vector
        raise ValueError(f"unknown target {key!r}")


class TargetComposition(LazyComposition):
    """One step's logits ``[*batch, vocab]`` as components, computed per target on demand.

    ``c[token].components`` (``c[row, token]`` for a batch) costs nothing for the step's
    target (computed with every other step's in one batched backward) and one more pass for
    any other token. ``c.recovery`` is the step's real logits, which the components of any
    token add up to (checked for the target). ``c.hidden`` and ``c.components`` (the whole
    vocabulary) are exact too but cost one backward per hidden dimension: use forward mode
    (``mode="forward"``) when you need them for many steps.
    """

    def __init__(self, run: TargetRun, step: int) -> None:
        self._run = run
        self._step = step
        self._known: dict[tuple[int, Any], Tensor] = {}  # (row, token or (a, b)) -> [C]
        self._hidden: Tensor | None = None
        self.target: pydec.Composition | None = None
        self.target_key: Any = None
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
        return self._run.components(self._step)

    @property
    def hidden(self) -> Tensor:
        """The decomposed final hidden state ``[C, *batch, hidden]``: one backward per dimension."""
        if self._hidden is None:
            d = int(self._run.weight.shape[1])
            eye = torch.eye(d, dtype=self.dtype, device=self.device)
            requests = [(self._step, ("vector", eye[j].expand(self._run.batch, d))) for j in range(d)]
            solved = self._run.solve(requests)[..., : self.numc()]  # [d, B, C] (bias share left out)
            hidden = solved.permute(2, 1, 0)
            self._hidden = hidden[:, 0] if self._squeeze else hidden
        return self._hidden

    def _remember(self, key: Any, contributions: Tensor) -> None:
        """Store ``contributions [B, C_all + 1]`` (the bias share last) of a per-row key."""
        for row in range(self._run.batch):
            self._known[(row, _what(key, row))] = _keep(contributions[row], self.numc())

    def _lookup(self, key: Any, row: int = 0) -> pydec.Composition:
        return self._composition(self._known[(row, _what(key, row))])

    def _composition(self, components: Tensor) -> pydec.Composition:
        return Contributions.of(components[:-1], components[-1])

    def _get(self, row: int, what: Any) -> Tensor:
        found = self._known.get((row, what))
        if found is None:
            batch = self._run.batch
            if isinstance(what, tuple):
                vector = self._run.head_row(what[0]) - self._run.head_row(what[1])
            else:
                vector = self._run.head_row(what)
            cot = vector.new_zeros((batch, vector.shape[0]))
            cot[row] = vector
            found = _keep(self._run.solve([(self._step, ("vector", cot))])[0, row], self.numc())
            self._known[(row, what)] = found
        return found

    def __getitem__(self, indices: Any) -> pydec.Composition:
        """``c[token]`` (or ``c[row, token]``) from a backward pass, not the full tensor."""
        parsed = None if pydec.is_c_accessing_enabled() else _parse_index(indices, self._squeeze)
        if parsed is not None and (parsed in self._known or self._full is None):
            return self._composition(self._get(*parsed))
        return super().__getitem__(indices)

    def contrast(self, a: int, b: int, row: int = 0) -> pydec.Composition:
        """Components of ``logit_a - logit_b`` (one pass if not computed yet)."""
        return self._composition(self._get(row, (int(a), int(b))))

    def check(self) -> None:
        """The target's components and bias share add up to the stock model's own logit (a
        plain forward, not the decomposition's pass), else :class:`DecompositionError`."""
        logits = self._run.stock_logits()[:, self._step]
        tol = self._run.tolerance
        for (row, what), comps in self._known.items():
            value = _logit(logits[row], what)
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
                    f"step {self._step}: contributions and bias share add up to {total:.6g}, the model's "
                    f"logit is {float(value):.6g} (relative error {err:.2e} > {tol:.0e}); an operation "
                    "outside llama_attrib's rules changed the hidden state"
                )

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"TargetComposition(size={tuple(self.shape)}, components={self.numc()}, "
            f"dtype={self.dtype}, step={self._step})"
        )


def _what(key: Any, row: int) -> Any:
    """Row ``row``'s part of a ``("token", ...)`` or ``("contrast", ...)`` key: a token id, or
    the pair ``(a, b)``."""
    return key[1][row] if key[0] == "token" else (key[1][row], key[2][row])


def _logit(logits: Tensor, what: Any) -> Tensor:
    """The logit of token ``what`` in ``logits [vocab]``, or ``logit_a - logit_b`` for a pair."""
    return logits[what[0]] - logits[what[1]] if isinstance(what, tuple) else logits[what]


def _keep(contributions: Tensor, count: int) -> Tensor:
    """The first ``count`` components and the bias share (the last column)."""
    return torch.cat([contributions[:count], contributions[-1:]])


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


# -- forward mode over a finished sequence ----------------------------------------------


def _forward_mode(
    model: nn.Module,
    session: Session,
    inputs: Inputs,
    members: Tensor | None,
    names: tuple[str, ...] | None,
    dtype: torch.dtype,
    budget: int,
    progress: bool | None,
) -> tuple[pydec.Composition, ...]:
    batch, length = inputs.ids.shape
    total = length if members is None else int(members.shape[0])
    per_chunk, chunks = memory.forward_chunks(
        model,
        batch,
        length,
        total,
        dtype,
        budget,
        "Use mode='target' (memory does not grow with the number of components), fewer rows, or a "
        "larger max_memory",
    )
    steps = len(inputs.positions)
    hidden: Tensor | None = None
    real: Tensor | None = None
    logits: Tensor | None = None
    residual: Tensor | None = None
    bar = _progress(progress, chunks, "components", work=total * length * batch)
    try:
        for c0 in range(0, total, per_chunk):
            c1 = min(total, c0 + per_chunk)
            rows = torch.eye(length, dtype=dtype)[c0:c1] if members is None else members[c0:c1]
            active = ForwardPass(dtype, layout=Layout.of(rows.to(dtype)))
            with session.running(active):
                inputs.call(model)
            head = active.head
            if head is None:
                raise DecompositionError("the decomposed forward never reached the LM head")
            part_real, part, part_residual = head
            if hidden is None:
                hidden = part.new_zeros((total, batch, steps, part.shape[-1]))
                real = inputs.select(part_real)
                assert active.logits is not None
                logits = inputs.select(active.logits).detach()
                if part_residual is not None:
                    residual = inputs.select(part_residual)
            hidden[c0:c1] = inputs.select(part, dim=1)
            bar.update(1)
    finally:
        bar.close()
    assert hidden is not None and real is not None and logits is not None
    tol = tolerance(real.dtype)
    err = completeness_error(real, hidden if residual is None else torch.cat([hidden, residual[None]]))
    if not err <= tol:
        raise DecompositionError(
            f"components do not add up to the final hidden state (relative error {err:.2e} > {tol:.0e})"
        )
    weight = session.family.head_weight(model)
    out_steps = []
    for k, position in enumerate(inputs.positions):
        count = total if members is not None else position + 1
        h, lg = hidden[:count, :, k], logits[:, k]
        res = None if residual is None else residual[:, k]
        if batch == 1:
            h, lg = h[:, 0], lg[0]
            res = None if res is None else res[0]
        c = LogitComposition(h, weight.detach(), lg, residual=res)
        c.names = names
        out_steps.append(c)
    return tuple(out_steps)


# -- helpers ----------------------------------------------------------------------------


def _as_batch(value: Any, name: str) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise UnsupportedOptionError(f"{name} must be [T] or [batch, T], got shape {tuple(t.shape)}")
    return t


def _per_step(value: Any, steps: int, batch: int, what: str) -> list[tuple[int, ...]]:
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


def _resolve_targets(targets: Any, next_tokens: Tensor | None, steps: int, batch: int) -> list[Any] | None:
    """Per step: ``("token", ids per row)``, ``("contrast", a per row, b per row)`` or None."""
    if targets is None:
        if next_tokens is None:
            return None
        return [("token", ids) for ids in _per_step(next_tokens, steps, batch, "targets")]
    if isinstance(targets, tuple) and len(targets) == 2:
        a = _per_step(targets[0], steps, batch, "targets[0]")
        b = _per_step(targets[1], steps, batch, "targets[1]")
        return [("contrast", x, y) for x, y in zip(a, b, strict=True)]
    return [("token", ids) for ids in _per_step(targets, steps, batch, "targets")]


def group_members(groups: Groups, length: int) -> tuple[Tensor, tuple[str, ...]]:
    """``[G, length]`` 0/1 membership and the groups' names (``"other"`` for the rest)."""
    if isinstance(groups, Tensor):
        ids = groups.long().flatten()
        if ids.shape[0] != length:
            raise UnsupportedOptionError(f"groups has {ids.shape[0]} entries for {length} positions")
        labels = sorted(set(ids.tolist()))
        members = torch.stack([(ids == g).float() for g in labels])
        return members, tuple(str(g) for g in labels)
    named: list[tuple[str, list[Span]]] = []
    if isinstance(groups, Mapping):
        for name, spans in groups.items():
            many = spans if spans and isinstance(spans[0], (tuple, list)) else [spans]
            named.append((str(name), [(int(s), int(e)) for s, e in many]))  # type: ignore[misc, arg-type]
    else:
        named = [(str(i), [(int(s), int(e))]) for i, (s, e) in enumerate(groups)]
    members = torch.zeros((len(named), length))
    for g, (name, spans) in enumerate(named):
        for start, end in spans:
            if not 0 <= start < end <= length:
                raise UnsupportedOptionError(
                    f"group {name!r}: span ({start}, {end}) is not inside the {length} positions"
                )
            members[g, start:end] = 1.0
    if bool((members.sum(0) > 1).any()):
        raise UnsupportedOptionError("groups overlap: each position may belong to one group only")
    names = [n for n, _ in named]
    rest = members.sum(0) == 0
    if bool(rest.any()):
        members = torch.cat([members, rest.float()[None]])
        names.append("other")
    return members, tuple(names)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(progress: bool | None, total: int, unit: str, work: int) -> Any:
    """A tqdm bar on stderr when asked, or (``None``) when the run is large enough to wait for."""
    show = progress if progress is not None else (total > 1 and work > 200_000)
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc="llama_attrib", leave=False)
