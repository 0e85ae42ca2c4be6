"""Forward mode over a finished sequence: components carried forward through every layer
(:mod:`..rules`), in chunks of components sized to the memory budget. Gives the whole
decomposed hidden state, so every token of the vocabulary is one dot product away."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

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
from .inputs import Inputs, progress_bar


def chunked(
    session: Session,
    members: Tensor | None,
    length: int,
    per_chunk: int,
    dtype: torch.dtype,
    make: Callable[[Layout], ForwardPass],
    call: Callable[[], Any],
) -> Iterator[tuple[int, int, ForwardPass]]:
    """Forward mode in chunks of ``per_chunk`` components: one per position of ``length``, or
    one per group (``members [G, length]``). For each chunk ``c0:c1`` a pass made by ``make``
    from the chunk's layout runs ``call`` (the model's forward); yields ``(c0, c1, pass)``."""
    total = length if members is None else int(members.shape[0])
    for c0 in range(0, total, per_chunk):
        c1 = min(total, c0 + per_chunk)
        if members is None:  # one row per position, without the whole identity matrix
            rows = torch.nn.functional.one_hot(torch.arange(c0, c1), length).to(dtype)
        else:
            rows = members[c0:c1].to(dtype)
        active = make(Layout.of(rows))
        with session.running(active):
            call()
        yield c0, c1, active


def reached_head(active: ForwardPass) -> tuple[Tensor, Tensor, Tensor | None]:
    """A decomposed forward's final hidden state: real ``[B, T, hidden]``, components
    ``[C, B, T, hidden]`` and the bias share ``[B, T, hidden]`` (or None)."""
    if active.head is None:
        raise DecompositionError("the decomposed forward never reached the LM head")
    return active.head


def check_head(real: Tensor, comps: Tensor, residual: Tensor | None, valid: Tensor | None = None) -> None:
    """The components and bias share add up to the real final hidden state (at the ``valid``
    ``[B, T]`` positions, all by default), else :class:`DecompositionError`."""
    checked = comps if residual is None else torch.cat([comps, residual[None]])
    if valid is not None:
        real, checked = real[valid], checked[:, valid]
    if not bool(torch.isfinite(real).all()):
        raise DecompositionError(
            "the model's own hidden state is not finite (NaN or inf) on this input: the model "
            "overflows by itself (float16 often does; try bfloat16 or float32), not llama_attrib"
        )
    tol = tolerance(real.dtype)
    err = completeness_error(real, checked)
    if not err <= tol:
        raise DecompositionError(
            f"components do not add up to the final hidden state (relative error {err:.2e} > "
            f"{tol:.0e}); an operation outside llama_attrib's rules changed the hidden state"
        )


def logit_composition(
    session: Session,
    model: nn.Module,
    hidden: Tensor,
    logits: Tensor,
    residual: Tensor | None,
    names: tuple[str, ...] | None = None,
) -> LogitComposition:
    """The logits of one position ``[*batch, vocab]`` from its decomposed final hidden state
    ``[C, *batch, hidden]``, with the model's head and final soft-cap."""
    family = session.family
    c = LogitComposition(
        hidden,
        family.head_weight(model).detach(),
        logits,
        residual=residual,
        softcap=family.final_softcap(model),
    )
    c.names = names
    return c


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
    bar = progress_bar(progress, chunks, "components", work=total * length * batch)
    try:
        make = lambda layout: ForwardPass(dtype, layout=layout)  # noqa: E731
        for c0, c1, active in chunked(
            session, members, length, per_chunk, dtype, make, lambda: inputs.call(session)
        ):
            part_real, part, part_residual = reached_head(active)
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
    check_head(real, hidden, residual)
    out_steps = []
    for k, position in enumerate(inputs.positions):
        count = total if members is not None else position + 1
        h, lg = hidden[:count, :, k], logits[:, k]
        res = None if residual is None else residual[:, k]
        if batch == 1:
            h, lg = h[:, 0], lg[0]
            res = None if res is None else res[0]
        out_steps.append(logit_composition(session, model, h, lg, res, names))
    return tuple(out_steps)
