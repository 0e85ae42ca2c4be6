"""llama_attrib's attention function, registered in transformers' ``AttentionInterface``.

A wrapped attention module, while it decomposes, runs its own stock forward (projections,
rope, q/k norms, cache update) and reads, for the length of the call, this function's name as
its attention implementation: its ``config`` is, on that instance only, a view of the model's
config (:class:`ConfigView`) that answers so while its probe runs, and the model's own value
otherwise; the model's config itself is never changed. The function receives exactly what
the model's chosen implementation would (queries and keys after every family quirk, the
family's mask with its sliding window, ``scaling``, ``softcap``), records what the frozen
attention probabilities are computed from, and calls that implementation for the real
output. Only the registry gains a name; no class or function of transformers is changed.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from . import rules

ATTENTION_NAME = "llama_attrib"
PROBE = "_llama_attrib_probe"  # per-instance attribute of a wrapped attention module


class Probe:
    """What one attention call records, and how it runs."""

    def __init__(self) -> None:
        self.running = False  # a decomposing call is in the module's forward
        self.original: str = "sdpa"  # the model's own implementation, for the real output
        self.skip = False  # target mode: only the probabilities' inputs are needed
        self.scores: rules.FrozenProbabilities | None = None
        self.output: Tensor | None = None  # the implementation's output [B, q, heads, hd]
        # target mode under a rule that credits queries and keys: (the rule, the unassigned
        # leaf, bytes of probabilities at a time); the function then differentiates by the rule
        self.credit: tuple[Any, Tensor, int | None] | None = None
        self.called = False


class ConfigView:
    """A wrapped attention module's ``config``: the model's config, read and written through,
    except that its attention implementation is llama_attrib's function while the module's
    probe runs."""

    def __init__(self, config: Any, probe: Probe) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_probe", probe)

    def __getattr__(self, name: str) -> Any:
        if name in ("_attn_implementation", "_attn_implementation_internal") and self._probe.running:
            return ATTENTION_NAME
        return getattr(self._config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._config, name, value)

    def __repr__(self) -> str:
        return repr(self._config)


def _implementation(module: nn.Module, name: str) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":  # each family has its own eager function (soft-cap, sinks...)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def attention_function(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    probe: Probe = module.__dict__[PROBE]
    scaling, softcap = kwargs.get("scaling"), kwargs.get("softcap")
    probe.called = True
    if probe.credit is not None:
        rule, unassigned, block = probe.credit
        # attention sinks under a path from uniform attention were refused before any work
        # (families.refuse_missing_rules, which every target-mode run calls first)
        sinks = kwargs.get("s_aux")
        # the forward's value is the model's own implementation's (on these queries, keys and
        # values): the pass then replays the layer as the model computed it
        with torch.no_grad():
            real = _implementation(module, probe.original)(
                module, query.detach(), key.detach(), value.detach(), attention_mask, **kwargs
            )[0]
        sinks = None if sinks is None else sinks.detach()
        spec = rules.lrp.Spec(attention_mask, scaling, softcap, real, rule, block, sinks)
        return rules.lrp.attend(query, key, value, unassigned, spec), None
    sinks = kwargs.get("s_aux")  # GPT-OSS: a learned logit per head in the softmax
    probe.scores = rules.FrozenProbabilities.of(module, query, key, attention_mask, scaling, softcap, sinks)
    if probe.skip:
        batch, heads, q, _ = query.shape
        return value.new_zeros((batch, q, heads, value.shape[-1])), None
    out: tuple[Tensor, Tensor | None] = _implementation(module, probe.original)(
        module, query, key, value, attention_mask, **kwargs
    )
    probe.output = out[0]
    return out


def register_attention() -> None:
    """Add llama_attrib's function to the public registry (once; idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention_function)
