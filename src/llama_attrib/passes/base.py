"""What every pass shares: the leaf forwards' default (the stock forward), the arguments they
read, and the stock attention run through llama_attrib's attention function."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .._attention import PROBE, Probe
from ..errors import DecompositionError
from ..families import Family
from ..rules.attention import ValueCaches


class Host(Protocol):
    """What a pass reads of the session it runs in (:class:`llama_attrib.session.Session`):
    the model's family, the dtype its hidden states are in, the factor its logits are scaled
    by, its decomposed value caches, and the modules of its last layer."""

    family: Family
    model_dtype: torch.dtype
    logit_scale: float
    caches: ValueCaches
    last_layer: set[int]


Args = tuple[Any, ...]
Kwargs = dict[str, Any]


class Pass:
    """One decomposing call of a wrapped model: how each kind of leaf module computes while it
    runs, and what the call collects. The session hands every leaf call to the active pass
    (one method per role); this base runs the stock forward everywhere. ``session`` is the
    wrapped model's (its family, its decomposed caches), bound while the pass runs."""

    session: Host

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype  # the components' dtype
        self.logits: Tensor | None = None  # the LM head's logits, as the model returns them

    def begin(self, session: Host) -> None:
        """Called when the pass becomes the active one."""
        self.session = session

    def failed(self) -> None:
        """Called when the model's forward raised while the pass was active."""

    def keep_logits(self, head_output: Tensor) -> None:
        """Keep the logits the LM head's output becomes (before any soft-cap): a family's
        ``logits_scaling`` applies to what the pass keeps, not to what the model receives."""
        scale = self.session.logit_scale
        self.logits = head_output if scale == 1.0 else head_output * scale

    def embedding(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        return original(*args, **kwargs)

    def norm(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        return original(*args, **kwargs)

    def attention(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        return original(*args, **kwargs)

    def mixer(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        return original(*args, **kwargs)

    def mlp(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        return original(*args, **kwargs)

    def lm_head(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        return original(*args, **kwargs)


def argument(args: Args, kwargs: Kwargs, name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


def hidden_states(args: Args, kwargs: Kwargs) -> Any:
    """A layer's or module's input hidden state (keyword ``hidden_states`` or first positional)."""
    return argument(args, kwargs, "hidden_states", 0)


def replace_hidden(args: Args, kwargs: Kwargs, value: Tensor) -> tuple[Args, Kwargs]:
    """The call's arguments with ``hidden_states`` (keyword or first positional) replaced."""
    if "hidden_states" in kwargs or not args:
        return args, {**kwargs, "hidden_states": value}
    return (value, *args[1:]), kwargs


def stock_attention(module: nn.Module, original: Any, args: Args, kwargs: Kwargs, skip: bool) -> Any:
    """The stock attention forward through llama_attrib's attention function, which records
    what the frozen probabilities are computed from (the queries and keys the family's own
    code made): ``(the stock output, rules.FrozenProbabilities)``. ``skip``: the function returns zeros
    instead of running the model's implementation (only the probabilities' inputs needed)."""
    probe: Probe = module.__dict__[PROBE]
    probe.skip, probe.scores = skip, None
    config: Any = module.config
    probe.original = config._attn_implementation  # the model's own (read before running)
    probe.running = True  # the module's config view now names llama_attrib's function
    try:
        out = original(*args, **kwargs)
    finally:
        probe.running = False
    scores, probe.scores = probe.scores, None  # the probe keeps nothing after the call
    output, probe.output = probe.output, None
    if scores is None:
        raise DecompositionError(f"{type(module).__name__} did not call its attention function")
    if output is not None:
        scores = replace(scores, mixed=output.flatten(2))
    return out, scores


def credited_attention(
    module: nn.Module, original: Any, args: Args, kwargs: Kwargs, credit: tuple[Any, Tensor, int | None]
) -> Any:
    """The stock attention forward, with a graph, whose attention function is differentiated
    by a rule set that credits queries and keys (``credit``: the probe's, see
    :class:`~llama_attrib._attention.Probe`): what the module returns."""
    probe: Probe = module.__dict__[PROBE]
    probe.credit, probe.called = credit, False
    config: Any = module.config
    probe.original = config._attn_implementation
    probe.running = True
    try:
        out = original(*args, **kwargs)
    finally:
        probe.running, probe.credit = False, None
    if not probe.called:
        raise DecompositionError(f"{type(module).__name__} did not call its attention function")
    return out
