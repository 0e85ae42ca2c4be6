"""Rule sets: what each kind of product of two token-dependent factors credits.

Every rule set shares the norms' frozen scales, the element-wise activations' identity rule
(``act(z) = z * (act(z) / z)``, the ratio frozen) and linear maps as they are; they differ in
how the two products of a decoder layer share what reaches them:

- the attention ``softmax(q k^T) v``: how much of its relevance goes through the values, how
  much through the queries and the keys (the softmax differentiated as it is, the soft-cap by
  the identity rule);
- the gated MLP ``act(gate(x)) * up(x)``: all through ``up`` with the gate frozen, or half each.

Whatever the softmax does not pass on is the ``unassigned`` share (:data:`..composition.SHARES`),
so components + shares = the logit under every rule set.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedOptionError


@dataclass(frozen=True)
class RuleSet:
    """``value`` / ``query`` / ``key``: the fraction of the attention output's relevance each
    path is credited with (the gradient of that input multiplied by it); ``gate``: the gated
    MLP's product, ``"frozen"`` (everything through ``up``) or ``"uniform"`` (half each);
    ``softmax``: how the probabilities' share reaches the scores, ``"gradient"`` (gradient x
    input at the real scores) or ``"path"`` (what uniform attention would give goes to the
    values, the rest along the path from uniform to real attention, ``steps`` midpoints)."""

    name: str
    value: float = 1.0
    query: float = 0.0
    key: float = 0.0
    gate: str = "frozen"
    softmax: str = "gradient"
    steps: int = 4
    summary: str = ""

    @property
    def frozen_attention(self) -> bool:
        """Whether the probabilities are frozen factors (no credit to queries and keys)."""
        return self.query == 0.0 and self.key == 0.0 and self.value == 1.0

    @property
    def exact(self) -> bool:
        """Whether every product is credited to one factor (the probabilities, the gate frozen):
        the decomposition of the logit into per-token parts with nothing unassigned."""
        return self.frozen_attention and self.gate == "frozen"


EXACT = RuleSet(
    "exact",
    summary="probabilities and gate frozen: everything flows through values and up (= LXT's CP-LRP)",
)
ATTNLRP = RuleSet(
    "attnlrp",
    value=0.5,
    query=0.25,
    key=0.25,
    gate="uniform",
    summary="AttnLRP (Achtibat et al., ICML 2024): values 1/2, queries and keys 1/4 each, gate x up 1/2 each",
)
PATH = RuleSet(
    "attnlrp-path",
    value=0.5,
    query=0.25,
    key=0.25,
    gate="uniform",
    softmax="path",
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
