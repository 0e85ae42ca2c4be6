"""Target mode's backward, one decoder layer at a time, in memory that does not grow with depth.

A plain forward of the stock model keeps only what enters each decoder layer (its real hidden
state and call arguments) and the final norm, and gives the stock logits. The cotangents of
the explained logits are then pulled back from the LM head to the first layer's input: each
layer runs again from its recorded input with a graph (its frozen factors recomputed from the
same real input), and one batched backward takes every target through it at once. A layer's
graph is the only one alive, and its attention probabilities are never held for more than one
block of queries unless they are small (:func:`rules.frozen_mix`). The rules are the module
forwards of target mode (:class:`Call`); nothing here knows a family.

The contribution of position ``i`` is ``grad_i . h_i`` at the first layer's input: every map
before it (the embedding, Gemma's scaling) is linear per position, so this equals the
gradient times the embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DecompositionError
from .session import Call, Session, argument, replace_hidden

LayerCall = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]


@dataclass
class Recorded:
    """A pass without a graph: each decoder layer's call, the final norm's input, the logits."""

    layers: list[LayerCall]
    final: Tensor  # [B, T, hidden], the last layer's output
    logits: Tensor  # the stock LM head's output at the kept positions [B, T_kept, vocab]

    @property
    def first_input(self) -> Tensor:
        _, args, kwargs = self.layers[0]
        return _hidden(args, kwargs)


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    x = argument(args, kwargs, "hidden_states", 0)
    if not isinstance(x, Tensor):
        raise DecompositionError("a decoder layer was called without its hidden states")
    return x


def record(model: nn.Module, session: Session, call: Call, run: Callable[[], Any]) -> Recorded:
    """Run ``run()`` (a forward of ``model``) as ``call`` (a capture) without a graph, keeping each
    decoder layer's call and the final norm's input (per-instance hooks, removed afterwards)."""
    base: Any = model.model
    layers: list[LayerCall] = []
    final: list[Tensor] = []

    def on_layer(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        layers.append((module, args, kwargs))

    def on_norm(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        final.append(_hidden(args, kwargs))

    handles = [layer.register_forward_pre_hook(on_layer, with_kwargs=True) for layer in base.layers]
    handles.append(base.norm.register_forward_pre_hook(on_norm, with_kwargs=True))
    try:
        with torch.no_grad(), session.running(call):
            run()
    finally:
        for handle in handles:
            handle.remove()
    if len(layers) != len(base.layers) or len(final) != 1 or call.logits is None:
        raise DecompositionError(
            f"the target-mode pass ran {len(layers)} of {len(base.layers)} decoder layers and the final "
            f"norm {len(final)} time(s): the model's forward does not call its layers once each"
        )
    return Recorded(layers, final[0], call.logits)


def through(
    session: Session,
    call: Callable[[], Call],
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    cotangents: list[Tensor],
) -> tuple[list[Tensor], list[Tensor]]:
    """Pull each ``[n, *y.shape]`` cotangent chunk back through ``y = fn(x)`` (``fn`` run once
    with a graph, as target mode): ``(gradients [n, *x.shape], bias shares [n, B])``."""
    running = call()
    x = x.detach().to(running.dtype).requires_grad_(True)
    with torch.enable_grad(), session.running(running):
        y = fn(x)
    leaves = running.bias_leaves
    grads, shares = [], []
    inputs = [x, *leaves]

    def pull(cot: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            y, inputs, cot, retain_graph=True, allow_unused=True, materialize_grads=True
        )

    for cot in cotangents:
        # torch.func.vmap rather than is_grads_batched: the attention's backward has its own
        # batching rule (rules._Transposed), one matrix product for all the targets
        found = torch.func.vmap(pull)(cot)
        share = cot.new_zeros(cot.shape[:2])
        for g, leaf in zip(found[1:], leaves, strict=True):
            share += (g * leaf.detach()).flatten(2).sum(-1)
        grads.append(found[0])
        shares.append(share)
    return grads, shares


def pull_back(
    session: Session,
    recorded: Recorded,
    call: Callable[[], Call],
    head: Callable[[Tensor], Tensor],
    cotangents: list[Tensor],
    tick: Callable[[], None] = lambda: None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Cotangent chunks ``[n, B, K, hidden]`` at the LM head's input (``head(final hidden)``)
    -> gradients ``[n, B, T, hidden]`` at the first layer's input, and bias shares ``[n, B]``."""
    grads, shares = through(session, call, head, recorded.final, cotangents)
    tick()
    for module, args, kwargs in reversed(recorded.layers):

        def layer(x: Tensor, module: nn.Module = module, args: Any = args, kwargs: Any = kwargs) -> Tensor:
            a, k = replace_hidden(args, kwargs, x)
            out = module(*a, **k)
            y: Tensor = out[0] if isinstance(out, tuple) else out
            return y

        grads, more = through(session, call, layer, _hidden(args, kwargs), grads)
        shares = [s + m for s, m in zip(shares, more, strict=True)]
        tick()
    return grads, shares
