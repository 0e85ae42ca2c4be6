"""Forward mode over a finished sequence: components carried forward through every layer
(:mod:`..rules`), in chunks of components sized to the memory budget. Gives the whole
decomposed hidden state, so every token of the vocabulary is one dot product away."""

from __future__ import annotations

import pydec
import torch
from torch import Tensor, nn

from .. import memory
from ..checks import completeness_error, tolerance
from ..composition import LogitComposition
from ..errors import DecompositionError
from ..passes import ForwardPass
from ..rules import Layout
from ..session import Session
from .inputs import Inputs, _progress


def forward_mode(
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
