"""The engines: decompose a finished sequence in one pass, every step's decomposition at once.

Two modes give the same numbers (tested to 1e-5 in float32): target mode (:mod:`.target`,
the default: memory does not grow with the number of components) and forward mode
(:mod:`.forward`: the whole decomposed hidden state). Both accept component groups: one
component per named span of positions (:func:`.inputs.group_members`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pydec
import torch
from torch import Tensor, nn

from .. import families, memory
from ..errors import UnsupportedOptionError
from ..rules.sets import RuleSet, refuse_forward_rules
from ..session import attached
from ..targets import Target
from .forward import forward_mode
from .inputs import MODES, Groups, Inputs, _as_batch, group_members
from .lazy import TargetComposition
from .target import Request, TargetRun

__all__ = [
    "MODES",
    "Groups",
    "Inputs",
    "TargetComposition",
    "TargetRun",
    "_as_batch",
    "explain",
    "group_members",
]


def explain(
    model: nn.Module,
    inputs: Inputs,
    *,
    mode: str = "target",
    targets: list[Target] | None = None,
    members: Tensor | None = None,
    names: tuple[str, ...] | None = None,
    component_dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    reference: Tensor | None = None,
    extra: Sequence[Request] = (),
    replay: list[Tensor] | None = None,
    precision: str | None = None,
    rules: str | RuleSet | None = None,
) -> tuple[pydec.Composition, ...]:
    """The per-step Compositions of one teacher-forced pass (see
    :func:`llama_attrib.decompose_sequence`), attached to the model for the call
    (:func:`..session.attached`; target mode's lazy Compositions attach again later). ``extra``: more
    target-mode requests solved with the targets (:meth:`TargetRun.compositions`). ``replay``:
    the layers' outputs generate computed (:class:`sweep.Capture`), for target mode's first pass.
    ``precision``: of target mode's backward products (:mod:`llama_attrib.precision`);
    ``rules``: the rule set (:mod:`llama_attrib.rules.sets`; forward mode has the exact one only)."""
    if mode == "forward":
        refuse_forward_rules(rules)
        if precision not in (None, "auto", "float32"):
            raise UnsupportedOptionError(f"precision={precision!r} applies to target mode: use mode='target'")
        dtype = component_dtype or families.component_dtype(model)
        limit = memory.budget(max_memory, next(model.parameters()).device)
        with attached(model) as session:
            return forward_mode(model, session, inputs, members, names, dtype, limit, progress)
    run = TargetRun.of(model, inputs, members, names, component_dtype, max_memory, progress, precision, rules)
    if reference is not None:
        # generate's own logits: what it chose each token from (a full forward can break a
        # near tie the other way), and what the components are checked against
        run.reference = reference.float()
        run.logits = reference.to(run.dtype)
    run.replay = replay
    return run.compositions(targets, extra)
