"""Attribution methods compared by the faithfulness harness, behind one signature.

Every method maps ``(model, ids [P + S], prompt_length P, setup)`` to ``S`` score vectors:
step ``k`` explains the logit of ``ids[P + k]`` at position ``P - 1 + k`` and scores the
``P + k`` positions before it (higher = more important for that token). Baselines:

- ``attention-last``: the last layer's attention from the explained position, mean over heads;
- ``attention-rollout``: Abnar & Zuidema's rollout, ``R = prod_l (0.5 A_l + 0.5 I)`` with
  ``A_l`` the head-mean attention renormalised by row, read at the explained position;
- ``input-x-gradient``: ``sum_h e_ih * d logit / d e_ih`` over the input embeddings ``e``;
- ``integrated-gradients``: captum ``LayerIntegratedGradients`` on the embedding layer, from
  the replacement token's embedding to the real one, ``setup.ig_steps`` steps;
- ``feature-ablation``: captum's LLM attribution: ``FeatureAblation`` of the target token's
  log-probability (``LLMAttribution``'s default target), each feature replaced by the
  replacement token. A feature is a token when the prefix has at most ``setup.ablation_tokens``
  tokens, so the scores equal ``LLMAttribution(FeatureAblation(model), tokenizer)`` on a
  ``TextTokenInput`` (a test checks it), and a sentence (tokens up to one containing ``.``,
  ``?``, ``!`` or a newline) otherwise, every token of a feature getting its score; unlike
  ``LLMAttribution`` it also ablates the earlier generated tokens of later steps, and runs
  ``setup.ablation_batch`` perturbations per forward;
- ``decomposition``: llama_attrib's exact decomposition of the logit (the components sum to
  it); ``decomposition-no-first``: the same scores with position 0, the attention sink, set
  below every other score (:func:`metrics.drop_first`), so it is ranked last; ``attnlrp``,
  ``attnlrp-path`` (and ``-no-first``): under those rule sets; ``<rule set>-logprob`` (and
  ``-no-first``, ``exact-logprob`` for the exact rules): of the log-probability target.

The gradient methods and the decomposition explain the target's logit; feature ablation its
log-probability, as captum's ``LLMAttribution`` does.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..api import decompose_sequence
from ..errors import require
from ..rules.sets import RULE_SETS
from .metrics import drop_first, logprob_fn

Method = Callable[[nn.Module, Tensor, int, "Setup"], list[Tensor]]
StepMethod = Callable[[nn.Module, Tensor, int, "Setup"], Tensor]


@dataclass
class Setup:
    """What the methods need besides the model and ids."""

    replacement: int
    ig_steps: int = 6
    ablation_tokens: int = 96
    ablation_batch: int = 16
    token_texts: list[str] = field(default_factory=list)  # decoded tokens of ids, for sentences


def decomposition(
    model: nn.Module,
    ids: Tensor,
    prompt_length: int,
    setup: Setup,
    rules: Any = "exact",
    target: str = "logit",
) -> list[Tensor]:
    """The one place that calls llama_attrib: contributions to each step's target logit.

    ``decompose_sequence`` in target mode (one frozen-factor pass and one batched backward
    for every step) under the rule set ``rules``; its numbers equal those of
    ``generate(..., decompose=True)``. ``target="logprob"``: to the token's log-probability
    target instead (its logit minus the probability-weighted mean logit, ``c.logprob``).
    """
    logprob = target == "logprob"
    compositions = decompose_sequence(
        model, ids, prompt_length, mode="target", rules=rules, targets="logprob" if logprob else None
    )
    out = []
    for k, c in enumerate(compositions):
        token = int(ids[prompt_length + k])
        out.append((c.logprob(token) if logprob else c[token]).components.detach().float())
    return out


def decomposition_no_first(model: nn.Module, ids: Tensor, prompt_length: int, setup: Setup) -> list[Tensor]:
    return [drop_first(s) for s in decomposition(model, ids, prompt_length, setup)]


def without_first(method: Method) -> Method:
    """``method``'s scores with position 0 ranked last (:func:`metrics.drop_first`)."""

    def scored(model: nn.Module, ids: Tensor, prompt_length: int, setup: Setup) -> list[Tensor]:
        return [drop_first(s) for s in method(model, ids, prompt_length, setup)]

    return scored


def under(rules: Any, target: str = "logit") -> Method:
    """:func:`decomposition` under another rule set, or of another target."""

    def method(model: nn.Module, ids: Tensor, prompt_length: int, setup: Setup) -> list[Tensor]:
        return decomposition(model, ids, prompt_length, setup, rules, target)

    return method


def per_step(fn: StepMethod) -> Method:
    """A method from one that explains the last position of a prefix for a target token."""

    def method(model: nn.Module, ids: Tensor, prompt_length: int, setup: Setup) -> list[Tensor]:
        return [
            fn(model, ids[: prompt_length + k], int(ids[prompt_length + k]), setup)
            for k in range(len(ids) - prompt_length)
        ]

    method.__doc__ = fn.__doc__
    return method


def _attentions(model: nn.Module, prefix: Tensor) -> list[Tensor]:
    """Head-mean attention of every layer, ``[T, T]`` each (eager attention for the call)."""
    config: Any = model.config
    saved = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(prefix[None], output_attentions=True, logits_to_keep=1)
    finally:
        config._attn_implementation = saved
    return [a[0].float().mean(0) for a in out.attentions]


def attention_last(model: nn.Module, prefix: Tensor, target: int, setup: Setup) -> Tensor:
    return _attentions(model, prefix)[-1][-1]


def attention_rollout(model: nn.Module, prefix: Tensor, target: int, setup: Setup) -> Tensor:
    eye = torch.eye(len(prefix))
    rollout = eye
    for a in _attentions(model, prefix):
        a = 0.5 * a + 0.5 * eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return rollout[-1]


def _logit(model: nn.Module, target: int) -> Callable[..., Tensor]:
    def forward(ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
        out = model(input_ids=ids, inputs_embeds=inputs_embeds, logits_to_keep=1)
        logits: Tensor = out.logits[:, -1, target]
        return logits

    return forward


def input_x_gradient(model: nn.Module, prefix: Tensor, target: int, setup: Setup) -> Tensor:
    lm: Any = model
    embeds: Tensor = lm.get_input_embeddings()(prefix[None]).detach().requires_grad_(True)
    _logit(model, target)(inputs_embeds=embeds).sum().backward()
    assert embeds.grad is not None
    return (embeds.grad * embeds).sum(-1)[0].detach().float()


def integrated_gradients(model: nn.Module, prefix: Tensor, target: int, setup: Setup) -> Tensor:
    require("captum", "eval", "integrated gradients")
    from captum.attr import LayerIntegratedGradients

    lm: Any = model
    lig = LayerIntegratedGradients(_logit(model, target), lm.get_input_embeddings())
    baseline = torch.full_like(prefix, setup.replacement)[None]
    attributions = lig.attribute(
        prefix[None], baselines=baseline, n_steps=setup.ig_steps, internal_batch_size=setup.ig_steps
    )
    scores: Tensor = attributions.sum(-1)[0].detach().float()
    return scores


def feature_groups(texts: list[str], length: int, max_tokens: int) -> Tensor:
    """``[length]`` feature index per token: one per token, or per sentence beyond ``max_tokens``."""
    if length <= max_tokens:
        return torch.arange(length)
    groups, current = [], 0
    for text in texts[:length]:
        groups.append(current)
        if any(ch in text for ch in ".?!\n"):
            current += 1
    return torch.tensor(groups)


def feature_ablation(model: nn.Module, prefix: Tensor, target: int, setup: Setup) -> Tensor:
    require("captum", "eval", "feature ablation")
    from captum.attr import FeatureAblation

    mask = feature_groups(setup.token_texts, len(prefix), setup.ablation_tokens)
    attributions = FeatureAblation(logprob_fn(model, target)).attribute(
        prefix[None],
        baselines=setup.replacement,
        feature_mask=mask[None],
        perturbations_per_eval=setup.ablation_batch,
    )
    scores: Tensor = attributions[0].detach().float()
    return scores


LXT_INSTALL = (
    "pip install --no-deps tests/data/lxt/lxt-2.1-py3-none-any.whl (a wheel of LXT's upstream source, "
    "kept in this repository: its PyPI release 2.1 breaks on transformers 5)"
)
LXT_MAPS = {"lxt-attnlrp": "attnLRP", "lxt-cp-lrp": "cp_LRP"}


def lxt(name: str) -> StepMethod:
    """LXT's own AttnLRP or CP-LRP (``name``: a key of :data:`LXT_MAPS`): its patches applied to
    the model's modeling module (process-wide: LXT changes the family's classes and transformers'
    attention registry), then embedding x gradient of the target logit, as LXT computes relevance.
    Run in its own process, with no other gradient method (:func:`check_lxt`)."""

    def method(model: nn.Module, prefix: Tensor, target: int, setup: Setup) -> Tensor:
        try:
            import lxt.efficient
        except ImportError as e:
            raise ImportError(f"the {name} method needs LXT: {LXT_INSTALL}") from e
        modeling = sys.modules[type(model).__module__]
        family = modeling.__name__.rsplit(".", 1)[-1].removeprefix("modeling_")
        patch_map = getattr(importlib.import_module(f"lxt.efficient.models.{family}"), LXT_MAPS[name])
        if getattr(modeling, "_llama_attrib_lxt", None) != name:
            lxt.efficient.monkey_patch(modeling, patch_map=patch_map, verbose=False)
            modeling._llama_attrib_lxt = name  # type: ignore[attr-defined]
        return input_x_gradient(model, prefix, target, setup)

    return method


def check_lxt(methods: list[str]) -> None:
    """LXT's patches change the gradients of the whole process: its methods run with the
    decompositions only (whose numbers use no gradient of the patched code), one LXT map per run."""
    lxt_methods = {*LXT_MAPS, *(f"{m}-no-first" for m in LXT_MAPS)}
    chosen = sorted({m.removesuffix("-no-first") for m in methods if m in lxt_methods})
    if not chosen:
        return
    others = [m for m in methods if m not in lxt_methods and m not in DECOMPOSITIONS]
    if len(chosen) > 1 or others:
        raise SystemExit(
            f"{', '.join(chosen)}: LXT patches transformers for the whole process; run one LXT method per "
            f"process, beside decompositions only (not {', '.join(others) or chosen[1]})"
        )


METHODS: dict[str, Method] = {
    "attention-last": per_step(attention_last),
    "attention-rollout": per_step(attention_rollout),
    "input-x-gradient": per_step(input_x_gradient),
    "integrated-gradients": per_step(integrated_gradients),
    "feature-ablation": per_step(feature_ablation),
    "decomposition": decomposition,
    "decomposition-no-first": decomposition_no_first,
}
# Methods whose scores are a function of another method's: computed from it, same timing.
DERIVED: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {
    "decomposition-no-first": ("decomposition", drop_first),
}
# llama_attrib's own methods, which use no gradient of the model's code (LXT may run beside them)
DECOMPOSITIONS = {"decomposition", "decomposition-no-first"}
# every other rule set's decomposition (``decomposition`` is the exact rules') and every rule
# set's decomposition of the log-probability target (the quantity the curves measure) rather
# than the logit, ``<rule set>-logprob`` (``exact-logprob``); each with and without the first token
for _name in RULE_SETS:
    for _method, _target in ((_name, "logit"), (f"{_name}-logprob", "logprob")):
        if _method == "exact":
            continue
        METHODS[_method] = under(_name, _target)
        METHODS[f"{_method}-no-first"] = without_first(under(_name, _target))
        DERIVED[f"{_method}-no-first"] = (_method, drop_first)
        DECOMPOSITIONS.update((_method, f"{_method}-no-first"))
# LXT's own rules: not in METHODS (they patch the process), added by the CLI when asked for
LXT_METHODS: dict[str, Method] = {}
for _name in LXT_MAPS:
    LXT_METHODS[_name] = per_step(lxt(_name))
    LXT_METHODS[f"{_name}-no-first"] = without_first(per_step(lxt(_name)))
    DERIVED[f"{_name}-no-first"] = (_name, drop_first)
