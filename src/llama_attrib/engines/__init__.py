"""The engines: decompose a finished sequence in one pass, every step's decomposition at once.

Two modes give the same numbers (tested to 1e-5 in float32): target mode (:mod:`.target`,
the default: memory does not grow with the number of components) and forward mode
(:mod:`.forward`: the whole decomposed hidden state). Both accept component groups: one
component per named span of positions (:func:`.inputs.group_members`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pydec
from torch import Tensor, nn

from .. import families, memory
from ..errors import UnsupportedOptionError
from ..rules.sets import refuse_forward_rules
from ..session import attached
from ..targets import Target
from .forward import forward_mode
from .inputs import MODES, Groups, Inputs, as_batch, group_members
from .lazy import TargetComposition
from .options import DEFAULT, Options
from .target import Request, TargetRun

__all__ = [
    "MODES",
    "Groups",
    "Inputs",
    "Options",
    "TargetComposition",
    "TargetRun",
    "as_batch",
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
    options: Options = DEFAULT,
    reference: Tensor | None = None,
    extra: Sequence[Request] = (),
    replay: list[Tensor] | None = None,
) -> tuple[pydec.Composition, ...]:
    """The per-step Compositions of one teacher-forced pass (see
    :func:`llama_attrib.decompose_sequence`), attached to the model for the call
    (:func:`..session.attached`; target mode's lazy Compositions attach again later). ``extra``: more
    target-mode requests solved with the targets (:meth:`TargetRun.compositions`). ``replay``:
    the layers' outputs generate computed (:class:`sweep.Capture`), for target mode's first pass.
    ``options``: :class:`.options.Options` (forward mode has the exact rules only)."""
    if mode == "forward":
        refuse_forward_rules(options.rules)
        if options.precision not in (None, "auto", "float32"):
            raise UnsupportedOptionError(
                f"precision={options.precision!r} applies to target mode: use mode='target'"
            )
        dtype = options.component_dtype or families.component_dtype(model)
        limit = memory.model_budget(model, options.max_memory)
        with attached(model) as session:
            return forward_mode(model, session, inputs, members, names, dtype, limit, options.progress)
    run = TargetRun.of(model, inputs, members, names, options)
    if reference is not None:
        # generate's own logits: what it chose each token from (a full forward can break a
        # near tie the other way), and what the components are checked against
        run.reference = reference.float()
        run.logits = reference.to(run.dtype)
    run.replay = replay
    return run.compositions(targets, extra)
