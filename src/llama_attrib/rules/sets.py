"""Rule sets: a map from each kind of product of two token-dependent factors to the rule that
passes the logit through it.

Every rule set shares the norms' frozen scales, the element-wise activations' identity rule
(``act(z) = z * (act(z) / z)``, the ratio frozen) and linear maps as they are. What differs is
the rule of each kind a family declares (LXT's shape: ``{kind of module: rule}``):

- ``ATTENTION``, ``softmax(q k^T) v``: :class:`FrozenProbabilities` (everything through the
  values) or :class:`Credited` (fractions through the values, the queries and the keys; the
  softmax differentiated at the real scores, or along the path from uniform attention);
- a gated MLP ``act(gate(x)) * up(x)`` (:class:`~.mlp.GatedMLP`), a gate-less one
  (:class:`~.mlp.MLP`) and a sparse mixture of experts (:class:`~.mlp.SparseMoE`):
  :class:`FrozenGate` (everything through ``up``, the gate a frozen factor) or
  :class:`UniformGate` (half through each factor; in a mixture of experts also each routing
  weight x its expert's output, the router's softmax differentiated at the real logits).

A kind the map has no rule for is refused when a model has it (:meth:`RuleSet.mlp`). Whatever
a rule passes to no input is the ``unassigned`` share (:data:`..composition.SHARES`), so
components + shares = the logit under every rule set. A new rule set is a new map here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from ..errors import UnsupportedOptionError
from .experts import ClampedExperts
from .mamba import Mamba2
from .mlp import MLP, GatedMLP, SparseMoE

ATTENTION = "attention"  # the role of attention in a rule set's map; MLPs are keyed by their maths' class


class TargetAttention(Protocol):
    """What target mode's pass offers an attention rule: the two ways it can run attention."""

    def frozen_attention(self, module: nn.Module, original: Any, args: Any, kwargs: Any) -> Any: ...

    def credited_attention(
        self, module: nn.Module, original: Any, args: Any, kwargs: Any, rule: Credited
    ) -> Any: ...


@dataclass(frozen=True)
class FrozenProbabilities:
    """The probabilities frozen factors: the attention's relevance all goes through the values."""

    frozen = True  # forward mode and flow() can carry it
    work = 1  # the backward's working memory per target, in units of the exact rules'
    tolerance = 0.0  # no more rounding than the model's own

    def target(self, on: TargetAttention, module: nn.Module, original: Any, args: Any, kwargs: Any) -> Any:
        return on.frozen_attention(module, original, args, kwargs)


@dataclass(frozen=True)
class Credited:
    """``value`` / ``query`` / ``key``: the fraction of the attention output's relevance each
    input is credited with (the gradient of that input multiplied by it). ``path``: 0, the
    softmax differentiated at the real scores (gradient x input); or that many midpoints of
    the path from uniform attention (what it would give goes to the values) to the real one
    (the rest, to the queries and keys). Computed by :mod:`.lrp`."""

    value: float = 0.5
    query: float = 0.25
    key: float = 0.25
    path: int = 0

    frozen = False
    # the backward's working memory per target, in units of the exact rules' (measured: 30
    # against 18 MiB per target at 2048 tokens)
    work = 2
    # the softmax's Jacobian adds up terms larger than the logit in float32: on SmolLM2's
    # 600-token prompts up to 1.2e-5 (3e-7 with that kernel in float64; docs/rules.md)
    tolerance = 3e-5

    def target(self, on: TargetAttention, module: nn.Module, original: Any, args: Any, kwargs: Any) -> Any:
        return on.credited_attention(module, original, args, kwargs, self)


class FrozenGate:
    """An MLP's gate (or activation ratio, or routing weights) a frozen factor: everything
    through the other factor."""

    frozen = True

    def factors(self, maths: Any, module: nn.Module, real: Tensor, dtype: Any) -> Any:
        return maths.factors(module, real, dtype)

    def apply(self, maths: Any, module: nn.Module, factors: Any, x: Tensor, t0: int) -> Tensor:
        out: Tensor = maths.apply(module, factors, x, t0)
        return out

    def bias(self, maths: Any, module: nn.Module, factors: Any) -> Tensor | None:
        out: Tensor | None = maths.bias(module, factors)
        return out

    def unassigned(self, maths: Any, module: nn.Module, factors: Any) -> Tensor | None:
        return None  # a frozen factor passes everything on


class UniformGate:
    """A gated MLP's product ``act(gate(x)) * up(x)`` credited half to each factor
    (:meth:`~.mlp.GatedMLP.uniform`)."""

    frozen = False

    def factors(self, maths: Any, module: nn.Module, real: Tensor, dtype: Any) -> Any:
        return maths.uniform_factors(module, real, dtype)

    def apply(self, maths: Any, module: nn.Module, factors: Any, x: Tensor, t0: int) -> Tensor:
        out: Tensor = maths.uniform(module, factors, x, t0)
        return out

    def bias(self, maths: Any, module: nn.Module, factors: Any) -> Tensor | None:
        out: Tensor | None = maths.uniform_bias(module, factors)
        return out

    def unassigned(self, maths: Any, module: nn.Module, factors: Any) -> Tensor | None:
        """What the rule passes to no input: a router's softmax differentiated at the real
        logits is not conservative (:meth:`~.mlp.SparseMoE.uniform_unassigned`)."""
        missing = getattr(maths, "uniform_unassigned", None)
        return None if missing is None else missing(module, factors)  # type: ignore[no-any-return]


FROZEN_GATE = FrozenGate()
UNIFORM_GATE = UniformGate()


@dataclass(frozen=True)
class RuleSet:
    """A rule set: ``by_kind`` maps :data:`ATTENTION` and each MLP maths class to its rule."""

    name: str
    by_kind: Mapping[Any, Any] = field(hash=False, compare=False)
    summary: str = ""

    @property
    def attention(self) -> FrozenProbabilities | Credited:
        found: FrozenProbabilities | Credited = self.by_kind[ATTENTION]
        return found

    def mlp(self, maths: Any, module: nn.Module) -> FrozenGate | UniformGate:
        """The rule of an MLP whose maths is ``maths`` (the family's rule object), or a refusal."""
        for kind in type(maths).__mro__:
            if kind in self.by_kind:
                found: FrozenGate | UniformGate = self.by_kind[kind]
                return found
        raise UnsupportedOptionError(
            f"rules={self.name!r}: {type(module).__name__} ({type(maths).__name__}) has no rule for "
            "its gate yet; use rules='exact'"
        )

    def with_rule(self, kind: Any, rule: Any) -> RuleSet:
        """This rule set with ``kind``'s rule replaced (``ATTENTION`` or an MLP maths class)."""
        return RuleSet(self.name, {**self.by_kind, kind: rule}, self.summary)

    @property
    def exact(self) -> bool:
        """Whether every rule is a frozen factor's: the decomposition of the logit into
        per-token parts with nothing unassigned, which forward mode and flow() carry."""
        return all(rule.frozen for rule in self.by_kind.values())


EXACT = RuleSet(
    "exact",
    {
        ATTENTION: FrozenProbabilities(),
        GatedMLP: FROZEN_GATE,
        MLP: FROZEN_GATE,
        SparseMoE: FROZEN_GATE,
        ClampedExperts: FROZEN_GATE,
        Mamba2: FROZEN_GATE,  # its selection (dt, B, C), activation ratio and gate frozen
    },
    summary="probabilities and gate frozen: everything flows through values and up (= LXT's CP-LRP)",
)
ATTNLRP = RuleSet(
    "attnlrp",
    {
        ATTENTION: Credited(),
        GatedMLP: UNIFORM_GATE,
        MLP: FROZEN_GATE,
        SparseMoE: UNIFORM_GATE,
        ClampedExperts: UNIFORM_GATE,
        Mamba2: UNIFORM_GATE,  # MambaLRP: the gate's product half to each side, the selection frozen
    },
    summary="AttnLRP (Achtibat et al., ICML 2024): values 1/2, queries and keys 1/4 each, gate x up 1/2 "
    "each, a routing weight x its expert's output 1/2 each",
)
PATH = RuleSet(
    "attnlrp-path",
    {
        ATTENTION: Credited(path=4),
        GatedMLP: UNIFORM_GATE,
        MLP: FROZEN_GATE,
        SparseMoE: UNIFORM_GATE,
        Mamba2: UNIFORM_GATE,
    },
    summary="AttnLRP's shares, the probabilities' half along the path from uniform attention: "
    "nearly conservative",
)
RULE_SETS = {r.name: r for r in (EXACT, ATTNLRP, PATH)}


def refuse_forward_rules(rules: str | RuleSet | None) -> None:
    """Forward mode and ``flow()`` carry frozen-factor components only: refuse any other rule set."""
    chosen = rule_set(rules)
    if not chosen.exact:
        raise UnsupportedOptionError(
            f"rules={chosen.name!r} credits the queries, keys or gate, which forward mode and flow() "
            "cannot carry (their components pass through frozen probabilities and gates): use "
            "target mode (decompose=True, mode='target'), or rules='exact'"
        )


def rule_set(rules: str | RuleSet | None) -> RuleSet:
    """The rule set named ``rules`` (default ``"exact"``)."""
    if rules is None:
        return EXACT
    if isinstance(rules, RuleSet):
        return rules
    found = RULE_SETS.get(rules)
    if found is None:
        raise UnsupportedOptionError(f"rules={rules!r}: choose one of {sorted(RULE_SETS)}")
    return found
