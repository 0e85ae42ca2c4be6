"""Target mode over a finished sequence: a stock forward, then the chosen target logits of
every step pulled back through one layer at a time in batched backwards (:mod:`..sweep`).
The contribution of position ``i`` is ``grad_i . h_i`` at the first layer's input. Memory
does not grow with the number of components; other tokens' contributions are computed on
demand (one more pass each time, batched per request)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import families, memory, sweep
from ..checks import tolerance
from ..errors import DecompositionError, UnsupportedOptionError
from ..passes import CapturePass, TargetPass
from ..precision import products, resolve
from ..rules.sets import EXACT, RuleSet
from ..session import attached
from ..targets import Head, Target, Token
from .inputs import Inputs, progress_bar
from .lazy import TargetComposition
from .options import Options

Request = tuple[int, Target | None]  # (step, target); None: each row's argmax at that step


class TargetRun:
    """The frozen-factor pass of one sequence, and batched backward passes through it."""

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        members: Tensor | None,
        names: tuple[str, ...] | None,
        dtype: torch.dtype,
        budget: int,
        progress: bool | None,
        unbudgeted: bool = False,
        precision: str = "float32",
        rule_set: RuleSet = EXACT,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.members = members
        self.names = names
        self.dtype = dtype
        self.budget = budget
        self.unbudgeted = unbudgeted
        self.progress = progress
        self.precision = precision  # of the backward's products: "float32" or "tf32"
        self.rule_set = rule_set
        self.model_dtype = families.model_dtype(model)
        batch, length = inputs.ids.shape
        layouts = memory.target_layouts(
            memory.Shape.of(model),
            batch,
            length,
            dtype,
            inputs.ids.device,
            self.model_dtype,
            factor=rule_set.attention.work,
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
        self.head = Head(self.weight, dtype, self.family.final_softcap(model) is not None)

    @staticmethod
    def of(
        model: nn.Module,
        inputs: Inputs,
        members: Tensor | None,
        names: tuple[str, ...] | None,
        options: Options,
    ) -> TargetRun:
        """A run with the :class:`.options.Options`' component dtype (or the default), memory
        budget, products' precision (:mod:`llama_attrib.precision`) and rule set."""
        families.refuse_missing_rules(model, families.family_of(model), options.rule_set)
        dtype = options.component_dtype or families.component_dtype(model)
        device = families.input_device(model)
        limit = memory.model_budget(model, options.max_memory)
        unbudgeted = options.max_memory is None
        chosen = resolve(options.precision, families.model_dtype(model), device)
        return TargetRun(
            model,
            inputs,
            members,
            names,
            dtype,
            limit,
            options.progress,
            unbudgeted=unbudgeted,
            precision=chosen,
            rule_set=options.rule_set,
        )

    @property
    def batch(self) -> int:
        return int(self.inputs.ids.shape[0])

    @property
    def tolerance(self) -> float:
        """How far a sum of components may be from the stock logit it explains: a
        half-precision model's own logit carries its rounding, whatever the components' dtype;
        TF32 products round like half precision."""
        half = self.model_dtype in (torch.float16, torch.bfloat16)
        if self.precision == "tf32" and self.inputs.ids.device.type == "cuda":
            return tolerance(torch.float32, rounded=True)
        # and no less than the attention rule's own rounding (rules.sets.Credited.tolerance)
        return max(tolerance(self.model_dtype if half else self.dtype), self.rule_set.attention.tolerance)

    def _pass(self, probabilities: tuple[int, int] | None) -> TargetPass:
        return TargetPass(
            self.dtype, keep_from=self.inputs.first, probabilities=probabilities, rule_set=self.rule_set
        )

    def stock_logits(self) -> Tensor:
        """The stock model's own logits at the explained positions (before a final soft-cap),
        which the components and residual are checked against: generate's, or those of the
        stock forward the first :meth:`solve` records."""
        assert self.reference is not None, "the stock logits are known once a pass has run"
        return self.reference

    def plan(self, n: int) -> tuple[memory.TargetSizes, tuple[int, int] | None]:
        """The sizes and probability blocks for ``n`` targets: the default blocks, unless
        smaller ones (none kept for the backward) leave room for the targets in fewer sweeps
        over the layers. Each sweep runs every layer again; smaller blocks cost little."""

        def sweeps(sizes: memory.TargetSizes) -> int:
            return math.ceil(n / sizes.chunks(n, self.budget, self.unbudgeted)[1])

        return min(self.layouts, key=lambda layout: sweeps(layout[0]))  # the first, of equals

    def chunks(self, n: int) -> tuple[int, int]:
        """``(targets per batched backward, targets per sweep)`` (:meth:`memory.TargetSizes.chunks`)."""
        return self.plan(n)[0].chunks(n, self.budget, self.unbudgeted)

    def solve(self, requests: Sequence[Request | list[Request]]) -> Tensor:
        """Contributions ``[N, B, C + len(SHARES)]`` for each ``(step, target)`` request: one
        per component, then the shares of no token (:data:`SHARES`: bias, rounding, unassigned;
        their sum is pydec's residual). A request that is a list of such pairs is their sum,
        pulled back as one target. A target (:mod:`llama_attrib.targets`) has a row per batch
        row; ``None`` is each row's argmax token at that step.
        """
        n = len(requests)
        per_chunk, per_sweep = self.chunks(n)
        probabilities = self.plan(n)[1]
        layers = len(self.family.layers(self.model))
        sweeps = math.ceil(n / per_sweep)
        results: list[Tensor] = []
        # attached for the pass: the model's own session, or (a model unwrapped since a lazy
        # Composition was made) one installed for the pass and restored after it
        with torch.inference_mode(False), attached(self.model) as session:
            # the stock forward, whose hidden states the layers' frozen factors are computed from
            replay, self.replay = self.replay, None
            recorded = sweep.record(
                self.model, session, CapturePass(self.dtype), lambda: self.inputs.call(session), replay
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
            bar = progress_bar(self.progress, sweeps * (layers + 1), "layer", work=work)
            for start in range(0, n, per_sweep):
                part = requests[start : start + per_sweep]
                cot = values.new_zeros((len(part), self.batch, steps, values.shape[-1]))
                for i, request in enumerate(part):
                    for step, target in request if isinstance(request, list) else [request]:
                        if not 0 <= step < steps:
                            raise IndexError(f"step {step} out of range ({steps} steps)")
                        resolved = self.resolve(step, target)
                        cot[i, :, step] += resolved.readout(self.head, self.stock_logits()[:, step]).to(cot)
                with products(self.precision, values.device):  # the sweep's, not the stock forward's
                    grads, shares = sweep.pull_back(
                        session,
                        recorded,
                        lambda: self._pass(probabilities),
                        head,
                        list(cot.split(per_chunk)),
                        bar.update,
                        self.inputs.mask,
                    )
                for g, share in zip(grads, shares, strict=True):
                    contributions = (g * values).sum(-1)  # [n, B, T]
                    if self.members is not None:
                        contributions = contributions @ self.members.to(contributions).T
                    results.append(torch.cat([contributions, share], -1).detach())
            bar.close()
        return torch.cat(results)

    def component_count(self, step: int) -> int:
        """How many components step ``step`` has: its position + 1, or the number of groups."""
        if self.members is not None:
            return int(self.members.shape[0])
        return self.inputs.positions[step] + 1

    def compositions(
        self, targets: list[Target] | None, extra: Sequence[Request] = ()
    ) -> tuple[TargetComposition, ...]:
        """One Composition per step, its target (default each row's argmax) solved; ``extra``:
        more ``(step, target)`` requests solved in the same pass and remembered by their steps."""
        steps = len(self.inputs.positions)
        wanted = targets if targets is not None else [None] * steps
        solved = self.solve([*enumerate(wanted), *extra])
        out = []
        for step, (target, contributions) in enumerate(zip(wanted, solved[:steps], strict=True)):
            c = TargetComposition(self, step)
            resolved = self.resolve(step, target)
            c._remember(resolved, contributions)
            c.target = c._lookup(resolved)
            c.target_key = resolved
            out.append(c)
        for (step, target), contributions in zip(extra, solved[steps:], strict=True):
            out[step]._remember(self.resolve(step, target), contributions)
        for c in out:
            c.check()
        return tuple(out)

    def answer(self, targets: list[Target] | None) -> Tensor:
        """Contributions ``[B, C_all + len(SHARES)]`` to the sum over steps of each step's target logit
        (``targets``, default each row's argmax), pulled back as one target: the sum over steps
        of what :meth:`compositions` gives (a step's components beyond its position are zero),
        at the cost of one target. Checked against the sum of the stock model's logits."""
        steps = len(self.inputs.positions)
        wanted = targets if targets is not None else [None] * steps
        if any(t is not None and not t.explains_logits for t in wanted):
            raise UnsupportedOptionError("an answer's targets are token ids, (a, b) pairs or 'logprob'")
        out: Tensor = self.solve([list(enumerate(wanted))])[0]
        logits = self.stock_logits()
        values = torch.stack(
            [self.resolve(step, t).value(logits[:, step]).double() for step, t in enumerate(wanted)]
        )  # [steps, B]
        for row in range(self.batch):
            value = float(values[:, row].sum())
            scale = sum(float(logits[row, step].abs().max()) for step in range(steps))
            total = float(out[row].sum())
            if not abs(total - value) <= self.tolerance * max(scale, 1e-30):
                raise DecompositionError(
                    f"row {row}: contributions and shares of no token add up to {total:.6g}, the sum of the "
                    f"model's logits is {value:.6g}; an operation outside llama_attrib's rules changed "
                    "the hidden state"
                )
        return out

    def resolve(self, step: int, target: Target | None) -> Target:
        """``None`` -> each row's argmax token at that step; a target, unchanged."""
        if target is not None:
            return target
        assert self.logits is not None, "logits are known once the pass has run"
        return Token(self.logits[:, step].argmax(-1))
