"""How a decomposition runs, whichever entry point asks: :class:`Options`, the keywords that
``decompose_sequence``, ``decompose_answer``, ``generate(decompose=...)``, ``attribute`` and the
CLI share, in one object the engines take."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..rules.sets import RuleSet, rule_set


@dataclass(frozen=True)
class Options:
    """``component_dtype``: precision of the components (default float32 for a half-precision
    model, the model's dtype otherwise). ``max_memory``: a budget in bytes (or ``"8GB"``);
    default 80% of the free memory; work is split into chunks to fit, and a run that cannot
    fit at all raises :class:`~llama_attrib.memory.MemoryBudgetError` before it starts.
    ``progress``: a progress bar (None: when the run is long). ``precision``: of target mode's
    backward products, ``"auto"`` (default), ``"float32"`` or ``"tf32"``
    (:mod:`llama_attrib.precision`). ``rules``: the rule set (:mod:`llama_attrib.rules.sets`),
    ``"exact"`` (default, or the wrapped model's), ``"attnlrp"`` or ``"attnlrp-path"``
    (target mode only); what it passes to no token is the ``unassigned`` share."""

    component_dtype: torch.dtype | None = None
    max_memory: int | str | None = None
    progress: bool | None = None
    precision: str | None = None
    rules: str | RuleSet | None = None

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(Options))

    @staticmethod
    def take(kwargs: dict[str, Any]) -> Options:
        """The options out of a call's keywords (``generate``'s), which keep the rest."""
        return Options(**{name: kwargs.pop(name) for name in Options.names() if name in kwargs})

    def given(self) -> dict[str, Any]:
        """The options set to something other than their default."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    @property
    def rule_set(self) -> RuleSet:
        return rule_set(self.rules)

    def replace(self, **changes: Any) -> Options:
        return dataclasses.replace(self, **changes)


DEFAULT = Options()
