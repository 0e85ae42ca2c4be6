"""Where each token's contribution travelled: the split of one logit over source x layer x
head/MLP.

With the frozen factors fixed, the final residual stream at a position is the embedding plus
what every attention and MLP block added there; each block's output is a sum over source
tokens; the final norm's frozen scale and the LM head row are linear. So

    logit = sum over sources i, layers l, parts p of scores[i, l, p] + sum_i embedding[i]
            (+ the biases' share, for a model with biases)

where ``p`` runs over the heads of layer ``l`` and then its MLP (for a mixture of experts, the
whole sparse block), and ``scores[i, l, p]`` is the part of that block's output that came from
token ``i``, read directly through the final norm and the LM head (a post-norm's frozen scale
too, for OLMo 2 and Gemma). Computed in one forward-mode pass over the sequence (components
in chunks sized to the memory budget): exact, not an approximation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import families, memory, rules, targets
from ._flow_view import Flow
from .checks import tolerance
from .engines.forward import chunked
from .engines.inputs import token_ids
from .errors import DecompositionError, UnsupportedOptionError
from .passes import FlowRecord, ForwardPass, hidden_states
from .rules.sets import refuse_forward_rules
from .session import Session, attached


def flow(
    model: nn.Module,
    input_ids: Tensor,
    position: int = -1,
    target: int | tuple[int, int] | targets.Target | None = None,
    *,
    attention_mask: Tensor | None = None,
    labels: Sequence[str] | None = None,
    max_memory: int | str | None = None,
    rules: str | None = None,
) -> Flow:
    """Split the logit of ``target`` at ``position`` over source x layer x head/MLP.

    ``input_ids``: ``[T]`` or ``[1, T]``; ``target``: a token id, a pair ``(a, b)`` for
    ``logit_a - logit_b``, a one-row :class:`~llama_attrib.targets.Target` (``LogProb(t)``), or
    None (the argmax at that position). ``labels``: a name per
    source token (e.g. its text). The model may be wrapped or not; it is left as it was.
    ``rules``: only the exact rules split a logit over heads and layers (their paths are
    linear once the probabilities are frozen); any other rule set is refused.
    """
    refuse_forward_rules(rules)
    ids = token_ids(model, input_ids)
    if ids.shape[0] != 1:
        raise UnsupportedOptionError(f"flow explains one sequence: input_ids has {ids.shape[0]} rows")
    length = int(ids.shape[1])
    position = position % length if -length <= position < length else -1
    if position < 0:
        raise UnsupportedOptionError(f"position out of range for {length} tokens")
    ids = ids[:, : position + 1]
    mask = (
        None
        if attention_mask is None
        else (attention_mask if attention_mask.dim() == 2 else attention_mask[None])
    )
    mask = None if mask is None else mask[:, : position + 1]
    ids, mask = families.to_input_device(model, ids, mask)
    families.check_length(model, position + 1)
    with attached(model) as session:
        family = session.family
        if family.mixer is not None:
            raise UnsupportedOptionError(
                f"flow() splits a logit over attention heads and MLPs; the state-space layers of "
                f"{type(model).__name__} are neither: use llama_attrib.decompose_sequence for this model"
            )
        dtype = session.dtype
        records, logits = _run(model, session, ids, mask, position, dtype, max_memory)
    return _assemble(model, family, records, logits, target, position, list(labels or []))


def _run(
    model: nn.Module,
    session: Session,
    ids: Tensor,
    mask: Tensor | None,
    position: int,
    dtype: torch.dtype,
    max_memory: int | str | None,
) -> tuple[list[tuple[FlowRecord, list[tuple[Tensor, Tensor | None]]]], Tensor]:
    """Forward mode over the sequence in chunks of components, recording at ``position``."""
    length = int(ids.shape[1])
    budget = memory.model_budget(model, max_memory)
    refusal = "flow runs forward mode: shorten the sequence or raise max_memory"
    per_chunk, _ = memory.forward_chunks(model, 1, length, length, dtype, budget, refusal)
    layers = session.family.layers(model)
    kwargs: dict[str, Any] = {"use_cache": False, "logits_to_keep": 1}
    if mask is not None:
        kwargs["attention_mask"] = mask
    streams: list[tuple[Tensor, Tensor | None]] = []  # the chunk's

    def call() -> None:
        # the residual stream at the position: into layer 0, then after each layer
        streams.clear()
        keep = _keeper(streams, position)
        hooks = [
            layers[0].register_forward_pre_hook(
                lambda m, args, kwargs: keep(hidden_states(args, kwargs)), with_kwargs=True
            )
        ]
        hooks += [layer.register_forward_hook(lambda m, a, output: keep(output)) for layer in layers]
        try:
            with torch.no_grad():
                session.plain(input_ids=ids, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    out: list[tuple[FlowRecord, list[tuple[Tensor, Tensor | None]]]] = []
    logits: Tensor | None = None

    def make(layout: rules.Layout) -> ForwardPass:
        return ForwardPass(dtype, layout=layout, flow=FlowRecord(position))

    for _, _, active in chunked(session, None, length, per_chunk, dtype, make, call):
        if active.logits is None or active.flow is None or len(streams) != len(layers) + 1:
            raise DecompositionError("the flow pass did not reach every layer and the LM head")
        logits = active.logits[0, -1]
        out.append((active.flow, list(streams)))
    assert logits is not None
    return out, logits


def _keeper(streams: list[tuple[Tensor, Tensor | None]], position: int) -> Any:
    def keep(stream: Any) -> None:
        from .stream import split

        _, comps, residual = split(stream[0] if isinstance(stream, tuple) else stream)
        # copies: a view would keep the layer's whole [C, 1, T, hidden] stream alive
        streams.append(
            (comps[:, 0, position].clone(), None if residual is None else residual[0, position].clone())
        )

    return keep


def _assemble(
    model: nn.Module,
    family: families.Family,
    chunks: list[tuple[FlowRecord, list[tuple[Tensor, Tensor | None]]]],
    logits: Tensor,
    target: Any,
    position: int,
    labels: list[str],
) -> Flow:
    if target is None:
        target = int(logits.argmax())
    explained = targets.of(target)
    assert explained is not None
    head = targets.Head(family.head_weight(model), torch.float32, family.final_softcap(model) is not None)
    row = explained.readout(head, logits[None])[0]
    logit = float(explained.value(logits[None].float())[0])
    first = chunks[0][0]
    final_norm = family.final_norm(model)
    factor = first.norm[id(final_norm)][0].float()
    read = family.norm.read(factor, row.to(factor.device))  # [hidden]
    final_bias = family.norm.bias(final_norm)
    final_bias_share = (
        0.0 if final_bias is None else float(row.to(factor.device) @ final_bias.float().to(factor))
    )
    block_scale = family.residual_scale(model)
    scores_parts, embedding_parts, stream_parts = [], [], []
    bias = None
    stream_bias = None
    for record, streams in chunks:
        per_layer, bias_layers = [], []
        for layer in family.layers(model):
            attention, mlp = family.block(layer, families.ATTENTION), family.block(layer, families.MLP)
            v_attn, v_mlp = read * block_scale, read * block_scale
            if "attention" in family.post_norms:
                post = record.norm[id(getattr(layer, family.post_norms["attention"]))][0].float()
                v_attn = family.norm.read(post, read)
            if "mlp" in family.post_norms:
                post = record.norm[id(getattr(layer, family.post_norms["mlp"]))][0].float()
                v_mlp = family.norm.read(post, read)
            w_o = family.attention.out.weight(attention).float()  # [hidden, heads*hd]
            u = w_o.T.to(v_attn) @ v_attn  # [heads*hd]
            mixed, mixed_bias = record.attention[id(attention)]
            hd = family.head_dim(attention)
            heads = (mixed[:, 0].float().reshape(mixed.shape[0], -1, hd) * u.view(-1, hd)).sum(
                -1
            )  # [C, heads]
            out, out_bias = record.mlp[id(mlp)]
            mlp_scores = out[:, 0].float() @ v_mlp  # [C]
            per_layer.append(torch.cat([heads, mlp_scores[:, None]], 1))
            b_heads = torch.zeros(heads.shape[1], device=read.device)
            if mixed_bias is not None:
                b_heads = (mixed_bias[0].float().view(-1, hd) * u.view(-1, hd)).sum(-1)
            b_o = family.attention.out.bias(attention)
            b_attn_o = 0.0 if b_o is None else float(b_o.float().to(v_attn) @ v_attn)
            b_mlp = 0.0 if out_bias is None else float(out_bias[0].float() @ v_mlp)
            b_heads = b_heads + b_attn_o / b_heads.shape[0]  # the output bias, shared over the heads
            bias_layers.append(torch.cat([b_heads, torch.tensor([b_mlp], device=b_heads.device)]))
        scores_parts.append(torch.stack(per_layer, 1))  # [C, layers, heads + 1]
        reads = [
            (comps.float() @ read, None if res is None else float(res.float() @ read))
            for comps, res in streams
        ]
        embedding_parts.append(reads[0][0])
        stream_parts.append(torch.stack([r for r, _ in reads]))  # [layers + 1, C]
        if bias is None:
            bias = torch.stack(bias_layers)
            stream_bias = torch.tensor([0.0 if b is None else b for _, b in reads])
    assert bias is not None and stream_bias is not None
    scores = torch.cat(scores_parts).cpu()
    embedding = torch.cat(embedding_parts).cpu()
    stream = torch.cat(stream_parts, 1).cpu()
    result = Flow(
        scores, embedding, bias.cpu(), stream, stream_bias, logit, target, position, labels, final_bias_share
    )
    if not bool(torch.isfinite(logits).all()):
        raise DecompositionError(
            "flow: the model's own logits are not finite (NaN or inf) on this input: the model "
            "overflows by itself (float16 often does; try bfloat16 or float32), not llama_attrib"
        )
    total = float(scores.sum() + embedding.sum() + result.bias.sum()) + final_bias_share
    scale = float(logits.float().abs().max())
    # the guard of the per-token decomposition; for a half-precision logit, the model's rounding
    if not abs(total - logit) <= tolerance(logits.dtype) * scale + 1e-6:
        raise DecompositionError(
            f"flow: paths add up to {total:.6g}, the logit is {logit:.6g}: this model's layer "
            "structure is not the residual stream llama_attrib assumed"
        )
    return result


__all__ = ["Flow", "flow"]
