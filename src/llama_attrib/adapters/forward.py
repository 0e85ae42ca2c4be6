"""The replacement ``forward`` of a wrapped model: forward mode runs inside the model's own
forward (a :class:`~llama_attrib.passes.ForwardPass`) and leaves the last position's
composition in ``out["attentions"]``; ``decompose="target"`` decomposes the whole sequence
afterwards (:func:`llama_attrib.engines.explain`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .. import families
from .._compat import CACHE_KEYWORDS, cache_length
from ..engines import Inputs, Options, explain
from ..engines.forward import check_head, logit_composition, reached_head
from ..engines.inputs import last_real
from ..errors import DecompositionError, UnsupportedOptionError
from ..passes import ForwardPass
from ..rules.sets import RuleSet, refuse_forward_rules
from ..session import Collecting, Forward, Recording, Session
from ..stream import strip
from .options import call_options, check_fits, decompose_mode, on_input_device, set_option


def forward_adapter(session: Session, model: nn.Module, original: Forward) -> Forward:
    signature = inspect.signature(original)

    def forward(*args: Any, decompose: bool | str | None = None, **kwargs: Any) -> Any:
        with session.lock:  # one call at a time: a decomposing call changes how the model runs
            return run(*args, decompose=decompose, **kwargs)

    def run(*args: Any, decompose: bool | str | None = None, **kwargs: Any) -> Any:
        generation = session.generation
        if isinstance(generation, Recording) and decompose is None:
            _record(generation, signature, args, kwargs)
        if not session.wants(decompose):
            return original(*args, **kwargs)
        mode = decompose_mode(decompose, "forward")
        families.refuse_images(kwargs)
        args, kwargs = on_input_device(model, args, kwargs)
        bound = signature.bind(*args, **kwargs)
        options = call_options(bound, signature)
        _check_forward_options(options)
        if mode == "target":
            return _target_forward(model, original, bound, options, session.rule_set)
        refuse_forward_rules(session.rule_set)
        set_option(bound, signature, "output_attentions", False)
        cache = next((options[k] for k in CACHE_KEYWORDS if options.get(k) is not None), None)
        expected = generation.expected_length if isinstance(generation, Collecting) else 0
        if not isinstance(generation, Collecting):  # a single forward (inside generate, generate checked)
            batch, length = options["input_ids"].shape
            families.check_length(model, cache_length(cache) + length)
            check_fits(model, cache_length(cache) + length, batch, "forward", None, session.dtype)
        active = ForwardPass(session.dtype, offset=cache_length(cache), expected_length=expected)
        with session.running(active):
            out = original(*bound.args, **bound.kwargs)
        return _attach(session, active, model, out, options.get("attention_mask"))

    return forward


def _record(generation: Recording, signature: inspect.Signature, args: Any, kwargs: dict[str, Any]) -> None:
    """Keep the attention mask and position ids generate passes (target-mode generation)."""
    options = call_options(signature.bind(*args, **kwargs), signature)
    generation.inputs.append((options.get("attention_mask"), options.get("position_ids")))


def _target_forward(
    model: nn.Module,
    original: Forward,
    bound: inspect.BoundArguments,
    options: dict[str, Any],
    ruleset: RuleSet,
) -> Any:
    """A forward with ``decompose="target"``: the real output, then the last position's target."""
    cache = next((options[k] for k in CACHE_KEYWORDS if options.get(k) is not None), None)
    if cache_length(cache):
        raise UnsupportedOptionError(
            'decompose="target" decomposes a whole sequence: call it without a filled cache, or use '
            "decompose=True (forward mode) to continue a cached decomposition"
        )
    families.refuse_missing_rules(model, families.family_of(model), ruleset)  # before the forward
    out = original(*bound.args, **bound.kwargs)
    ids = options["input_ids"]
    mask = options.get("attention_mask")
    last = last_real(mask, int(ids.shape[-1]))
    inputs = Inputs(ids, mask, options.get("position_ids"), [int(ids.shape[-1]) - 1], last)
    (composition,) = explain(model, inputs, mode="target", options=Options(rules=ruleset))
    out["attentions"] = composition
    return out


def _attach(session: Session, active: ForwardPass, model: nn.Module, out: Any, mask: Any = None) -> Any:
    """Put the last position's LogitComposition in ``out["attentions"]``."""
    real, comps, residual = reached_head(active)
    valid = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= real.shape[1]:
        # Padding positions attend to nothing real (their outputs are whatever the attention
        # kernel makes of a fully masked row) and feed no other position: not checked.
        valid = mask[:, mask.shape[-1] - real.shape[1] :].bool().to(real.device)
    try:
        check_head(real, comps, residual, valid)
    except DecompositionError:
        session.caches.clear()
        raise
    for key in ("hidden_states", "last_hidden_state"):
        if out.get(key) is not None:
            out[key] = strip(out[key])
    stock = active.logits if active.logits is not None else out["logits"]
    res = None if residual is None else residual[:, -1].detach()
    hidden, logits = comps[:, :, -1].detach(), stock[:, -1]
    last = last_real(mask, comps.shape[2])
    if last is not None and stock.shape[1] == comps.shape[2]:
        # Right padding: each row's composition is at its last real token, not at a pad.
        rows = torch.arange(comps.shape[1], device=comps.device)
        at = last.to(comps.device)
        hidden, logits = comps[:, rows, at].detach(), stock[rows, last]
        res = None if residual is None else residual[rows, at].detach()
    if hidden.shape[1] == 1:
        hidden, logits = hidden[:, 0], logits[0]
        res = None if res is None else res[0]
    composition = logit_composition(session, model, hidden, logits, res)
    out["attentions"] = composition
    if isinstance(session.generation, Collecting):
        session.generation.steps.append(composition)
    return out


def _check_forward_options(options: dict[str, Any]) -> None:
    if options.get("inputs_embeds") is not None:
        raise UnsupportedOptionError(
            "decompose=True needs input_ids: with inputs_embeds there are no tokens to attribute to"
        )
    if options.get("input_ids") is None:
        raise UnsupportedOptionError("decompose=True needs input_ids")
    if options.get("return_dict") is False:
        raise UnsupportedOptionError(
            "decompose=True returns the decomposition in the output's 'attentions': "
            "call without return_dict=False"
        )
