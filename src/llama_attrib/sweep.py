"""Target mode's backward, one decoder layer at a time, in memory that does not grow with depth.

A plain forward of the stock model keeps only what enters each decoder layer (its real hidden
state and call arguments) and the final norm, and gives the stock logits; after ``generate``,
whose calls kept those hidden states (:class:`Capture`), that forward only replays them. The cotangents of
the explained logits are then pulled back from the LM head to the first layer's input: each
layer runs again from its recorded input with a graph (its frozen factors recomputed from the
same real input), and one batched backward takes every target through it at once. A layer's
graph is the only one alive, and its attention probabilities are never held for more than one
block of queries unless they are small (:func:`rules.frozen_mix`). The rules are the module
forwards of target mode (:class:`~llama_attrib.passes.TargetPass`); the family only says where
the layers and the final norm are.

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
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from . import quantized
from .checks import completeness_error, tf32_products, tolerance
from .composition import SHARES
from .errors import DecompositionError
from .families import Family
from .passes import CapturePass, TargetPass, hidden_states, replace_hidden
from .patching import Patch, replace_method, restore_all
from .rules.linear import rounding
from .session import Session

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
    x = hidden_states(args, kwargs)
    if not isinstance(x, Tensor):
        raise DecompositionError("a decoder layer was called without its hidden states")
    return x


class Capture:
    """What each decoder layer returns during ``generate``, call by call (per-instance hooks,
    while the block is open): the hidden states the target-mode pass would otherwise compute
    again with a stock forward of the whole sequence.

    They are kept as generate computed them, the prompt in one call and each new token with
    the cache: the real hidden states of what was generated. Replayable only if each layer
    returns a tensor that is, as it is, the next layer's (or the final norm's) input."""

    def __init__(self, model: nn.Module, family: Family) -> None:
        self.layers = family.layers(model)
        self.norm = family.final_norm(model)
        self.pieces: list[list[Tensor]] = [[] for _ in self.layers]
        self.usable = True
        self.previous: Tensor | None = None  # the last layer output, which the next call must receive
        self.handles: list[Any] = []

    def __enter__(self) -> Capture:
        # a hook of the user's on a layer would run again on the replayed output
        modules = [*self.layers, self.norm]
        hooked = _global_forward_hooks or _global_forward_pre_hooks
        self.usable = not hooked and not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
        for layer, pieces in zip(self.layers, self.pieces, strict=True):

            def on_output(module: nn.Module, args: Any, output: Any, pieces: list[Tensor] = pieces) -> None:
                self.previous = output if isinstance(output, Tensor) else None
                self.usable = self.usable and self.previous is not None
                if self.previous is not None:
                    pieces.append(self.previous.detach())

            self.handles.append(layer.register_forward_hook(on_output))
        for module in modules[1:]:
            self.handles.append(module.register_forward_pre_hook(self._received, with_kwargs=True))
        return self

    def _received(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.usable = self.usable and _hidden(args, kwargs) is self.previous

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.previous = None

    def outputs(self, length: int) -> list[Tensor] | None:
        """Each layer's output over the first ``length`` positions (joined along the sequence,
        the pieces freed as it goes); None when the calls did not cover them once each in
        order, or a layer cannot be replayed."""
        if not self.usable or any(sum(p.shape[1] for p in pieces) != length for pieces in self.pieces):
            self.pieces = [[] for _ in self.layers]
            return None
        out = []
        for i, pieces in enumerate(self.pieces):
            whole = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
            out.append(whole.clone() if whole.is_inference() else whole)  # generate in inference_mode
            self.pieces[i] = []
        return out


def record(
    model: nn.Module,
    session: Session,
    capture: CapturePass,
    run: Callable[[], Any],
    replay: list[Tensor] | None = None,
) -> Recorded:
    """Run ``run()`` (a forward of ``model``) under ``capture`` without a graph, keeping each
    decoder layer's call and the final norm's input (per-instance hooks, removed afterwards).

    ``replay``: each layer's output, as :class:`Capture` kept it from generate. The layers then
    return it instead of computing it (per-instance forward patches, restored afterwards): the
    pass only builds the layers' call arguments (masks, rotary embeddings) and the logits at the
    explained positions."""
    stock_layers, norm = session.family.layers(model), session.family.final_norm(model)
    layers: list[LayerCall] = []
    final: list[Tensor] = []

    def on_layer(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        layers.append((module, args, kwargs))

    def on_norm(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        final.append(_hidden(args, kwargs))

    def returning(output: Tensor) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return lambda original: lambda *args, **kwargs: output

    handles = [layer.register_forward_pre_hook(on_layer, with_kwargs=True) for layer in stock_layers]
    handles.append(norm.register_forward_pre_hook(on_norm, with_kwargs=True))
    patches: list[Patch] = []
    try:
        if replay is not None:
            for layer, output in zip(stock_layers, replay, strict=True):
                patches.append(replace_method(layer, "forward", returning(output)))
        with torch.no_grad(), session.running(capture):
            run()
    finally:
        restore_all(patches)
        for handle in handles:
            handle.remove()
    if len(layers) != len(stock_layers) or len(final) != 1 or capture.logits is None:
        raise DecompositionError(
            f"the target-mode pass ran {len(layers)} of {len(stock_layers)} decoder layers and the final "
            f"norm {len(final)} time(s): the model's forward does not call its layers once each"
        )
    return Recorded(layers, final[0], capture.logits)


def through_one(
    session: Session,
    make_pass: Callable[[], TargetPass],
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    cotangents: list[Tensor],
    expected: tuple[Tensor, Tensor | None] | None = None,
    absorb: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """Pull each ``[n, *y.shape]`` cotangent chunk back through ``y = fn(x)`` (``fn`` run once
    with a graph, as target mode): ``(gradients [n, *x.shape], shares [n, B, len(SHARES)])``. The list
    ``cotangents`` is emptied as it goes: a chunk's cotangent is freed once its gradient exists,
    so a sweep holds one gradient per target and one chunk's second one, not two per target.

    ``absorb`` (a layer with kernels that round, :func:`quantized.rounds`): what the replayed
    output still differs from the ``expected`` one (a bfloat16 kernel rounds a whole sequence
    otherwise than generate's token-by-token calls) goes to the rounding share, once the replay
    check has bounded it by the half-precision tolerance."""
    active = make_pass()
    x = x.detach().to(active.dtype).requires_grad_(True)
    with torch.enable_grad(), session.running(active), rounding(active.rounding()):
        y = fn(x)
    difference = None
    if expected is not None:
        _check_replayed(y.detach(), *expected, rounded=absorb)
        if absorb:
            output, mask = expected
            difference = output.to(y) - y.detach()
            keep = torch.isfinite(difference)
            if mask is not None and mask.shape == y.shape[:2]:
                keep &= mask.bool().to(y.device)[..., None]
            difference = torch.where(keep, difference, 0.0)
    kinds = [active.bias_leaves, active.rounding_leaves, active.unassigned_leaves]  # SHARES' order
    leaves = [leaf for kind in kinds for leaf in kind]
    which = [i for i, kind in enumerate(kinds) for _ in kind]
    grads, shares = [], []
    inputs = [x, *leaves]

    def pull(cot: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            y, inputs, cot, retain_graph=True, allow_unused=True, materialize_grads=True
        )

    while cotangents:
        cot = cotangents.pop(0)
        # torch.func.vmap rather than is_grads_batched: the attention's backward has its own
        # batching rule (rules.kernels._Transposed), one matrix product for all the targets
        found = torch.func.vmap(pull)(cot)
        share = cot.new_zeros((*cot.shape[:2], len(SHARES)))
        if difference is not None:  # a leaf added to y: its gradient is the cotangent
            share[..., SHARES.index("rounding")] += (cot * difference).flatten(2).sum(-1)
        del cot
        for g, leaf, i in zip(found[1:], leaves, which, strict=True):
            share[..., i] += (g * leaf.detach()).flatten(2).sum(-1)
        grads.append(found[0])
        shares.append(share)
    return grads, shares


def pull_back(
    session: Session,
    recorded: Recorded,
    make_pass: Callable[[], TargetPass],
    head: Callable[[Tensor], Tensor],
    cotangents: list[Tensor],
    tick: Callable[[], None] = lambda: None,
    mask: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Cotangent chunks ``[n, B, K, hidden]`` at the LM head's input (``head(final hidden)``)
    -> gradients ``[n, B, T, hidden]`` at the first layer's input, and the shares of no token
    ``[n, B, len(SHARES)]``.
    Each layer's output in the pass is checked against the recorded one (at the positions
    ``mask`` attends to: a pad position's output is whatever a fully masked row gives)."""
    grads, shares = through_one(session, make_pass, head, recorded.final, cotangents)
    tick()
    absorb = any(quantized.rounds(m) for layer, _, _ in recorded.layers for m in layer.modules())
    outputs = [_hidden(args, kwargs) for _, args, kwargs in recorded.layers[1:]] + [recorded.final]
    for (module, args, kwargs), output in zip(reversed(recorded.layers), reversed(outputs), strict=True):

        def layer(x: Tensor, module: nn.Module = module, args: Any = args, kwargs: Any = kwargs) -> Tensor:
            a, k = replace_hidden(args, kwargs, x)
            out = module(*a, **k)
            y: Tensor = out[0] if isinstance(out, tuple) else out
            return y

        expected = (output, mask)
        grads, more = through_one(
            session, make_pass, layer, _hidden(args, kwargs), grads, expected, absorb=absorb
        )
        shares = [s + m for s, m in zip(shares, more, strict=True)]
        tick()
    return grads, shares


def _check_replayed(output: Tensor, expected: Tensor, mask: Tensor | None, rounded: bool = False) -> None:
    """A layer run again in the pass gives the output the recorded forward (or generate) gave,
    else the pass would explain another computation than the one that made the tokens."""
    if output.shape != expected.shape:
        return
    real = expected.to(output)
    if mask is not None and mask.shape == output.shape[:2]:
        keep = mask.bool().to(output.device)
        output, real = output[keep], real[keep]
    if not bool(torch.isfinite(real).all()):
        return  # a non-finite model is reported by the logit check, with its own message
    err = completeness_error(real, output[None])  # one "component": the output itself
    if not err <= tolerance(expected.dtype, rounded or tf32_products(output)):
        raise DecompositionError(
            f"a decoder layer run again from its recorded input gives another output than the one "
            f"recorded (relative {err:.1e}). Either this model computes a position differently with "
            "a cache than without one (a length-dependent rope such as longrope crossing "
            "original_max_position_embeddings during generate does: use decompose='forward', which "
            "follows generate's own computation step by step, or llama_attrib.decompose_sequence "
            "for the teacher-forced logits), or a rule does not reproduce this layer (please report it)"
        )
