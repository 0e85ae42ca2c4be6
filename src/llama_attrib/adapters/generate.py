"""The replacement ``generate`` of a wrapped model: target mode generates plainly (recording
the masks and positions it used, :class:`~llama_attrib.session.Recording`) and then decomposes
the finished sequences in one pass; forward mode decomposes each of generate's forwards as it
runs (:class:`~llama_attrib.session.Collecting`)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from .. import _compat, families, sweep
from ..engines import Inputs, Options, explain
from ..engines.inputs import positions_from_mask
from ..errors import DecompositionError, GeneratedTokenWarning, UnsupportedOptionError
from ..rules.sets import refuse_forward_rules, rule_set
from ..session import Collecting, Forward, Recording, Session
from ..targets import Target, Token
from .options import check_fits, decompose_mode, on_input_device, prompt_ids_of

# Options of a target-mode generate that are llama_attrib's, not generate's.

_REFUSED_GENERATION = {
    "num_beams": (lambda v: v is not None and v > 1, "beam search (num_beams > 1)"),
    "assistant_model": (lambda v: v is not None, "assisted generation (assistant_model)"),
    "prompt_lookup_num_tokens": (lambda v: v is not None, "prompt lookup decoding"),
    "cache_implementation": (
        lambda v: v not in (None, "dynamic"),
        "a cache other than the default dynamic cache (cache_implementation)",
    ),
}


def _generation_option(default_config: Any, kwargs: dict[str, Any], key: str) -> Any:
    """The value generate will use for ``key``: keyword, else generation_config, else default."""
    if key in kwargs:
        return kwargs[key]
    config = kwargs.get("generation_config") or default_config
    return getattr(config, key, None)


def _expected_length(default_config: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Prompt length + max_new_tokens of a generate call (0 if unknown): the size to reserve."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    new = _generation_option(default_config, kwargs, "max_new_tokens")
    if not isinstance(ids, torch.Tensor) or not isinstance(new, int):
        return 0
    return int(ids.shape[-1]) + new


def generate_adapter(session: Session, model: nn.Module, original: Forward) -> Forward:
    generation_config = getattr(getattr(original, "__self__", None), "generation_config", None)

    def generate(*args: Any, decompose: bool | str | None = None, **kwargs: Any) -> Any:
        with session.lock:  # one call at a time: a decomposing call changes how the model runs
            return run(*args, decompose=decompose, **kwargs)

    def run(*args: Any, decompose: bool | str | None = None, **kwargs: Any) -> Any:
        if not session.wants(decompose):
            return original(*args, **kwargs)
        mode = decompose_mode(decompose, "target")
        families.refuse_images(kwargs)
        args, kwargs = on_input_device(model, args, kwargs)
        if kwargs.get("return_dict_in_generate") is False:
            raise UnsupportedOptionError(
                "decompose=True returns one Composition per generated token in "
                "out['attentions']: call with return_dict_in_generate=True"
            )
        kwargs = {**kwargs, "return_dict_in_generate": True, "output_attentions": False}
        if session.generation is not None:
            raise DecompositionError("a decomposed generate was called from inside another one")
        # the decomposition's options, taken out of generate's (the rest goes to generate)
        options = Options.take(kwargs)
        options = options.replace(rules=rule_set(options.rules or session.rule_set))
        families.refuse_missing_rules(model, session.family, options.rule_set)  # before generating
        families.check_length(model, _expected_length(generation_config, args, kwargs))
        if mode == "target":
            # one row of generate's logits per returned sequence and step: no beams, no drafts
            simple = not any(
                _REFUSED_GENERATION[key][0](_generation_option(generation_config, kwargs, key))
                for key in ("num_beams", "assistant_model", "prompt_lookup_num_tokens")
            )
            greedy = simple and not _generation_option(generation_config, kwargs, "do_sample")
            return _generate_target(session, model, original, args, kwargs, options, simple, greedy)
        problems = [
            what
            for key, (refused, what) in _REFUSED_GENERATION.items()
            if refused(_generation_option(generation_config, kwargs, key))
        ]
        if problems:
            raise UnsupportedOptionError(
                'decompose="forward" does not support ' + ", ".join(problems) + "; use "
                "decompose=True (target mode decomposes the finished sequences of any decoding "
                "strategy)"
            )
        refuse_forward_rules(options.rules)
        target_only = sorted(set(options.replace(rules=None).given()) - {"max_memory"})
        if target_only:
            raise UnsupportedOptionError(
                f"{target_only} apply to target mode: use decompose=True, or "
                "llama_attrib.decompose_sequence(..., mode='forward') on the finished sequence"
            )
        expected = _expected_length(generation_config, args, kwargs)
        if expected:
            batch = int(prompt_ids_of(args, kwargs).shape[0])
            check_fits(model, expected, batch, "generate", options.max_memory, session.dtype)
        generation = session.generation = Collecting(expected)
        try:
            out = original(*args, **kwargs)
        finally:
            session.generation = None
            session.caches.clear()
        out["attentions"] = tuple(generation.steps)
        _mark_tokens(out, int(prompt_ids_of(args, kwargs).shape[-1]))
        return out

    return generate


def _mark_tokens(out: Any, prompt: int) -> None:
    """Give each step's Composition the token generate actually produced (``c.token``: an int,
    or one per row), and say once when it is not the argmax of the logits the step explains
    (a logits processor, ``repetition_penalty`` or sampling chose it): then the documented
    ``c[c.recovery.argmax(0)]`` explains another token than the one in the text."""
    sequences = out.sequences
    differs = []
    for k, c in enumerate(out["attentions"]):
        tokens = sequences[:, prompt + k]
        c.token = int(tokens[0]) if tokens.shape[0] == 1 else tuple(int(t) for t in tokens.tolist())
        argmax = c.logits.argmax(-1).reshape(-1).to(tokens.device)
        if not torch.equal(argmax, tokens):
            differs.append(k)
    if differs:
        warnings.warn(
            f"at step(s) {differs} the generated token is not the argmax of the logits (a logits "
            "processor, repetition_penalty or sampling chose it): c[c.recovery.argmax(0)] explains "
            "the argmax, c[c.token] the generated token",
            GeneratedTokenWarning,
            stacklevel=3,
        )


def _generate_target(
    session: Session,
    model: nn.Module,
    original: Forward,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Options,
    simple: bool = False,
    greedy: bool = False,
) -> Any:
    """Plain generation (recording the masks and positions it used), then one target-mode pass.

    ``greedy``: where a logits processor (``min_new_tokens``, ``repetition_penalty``, ...) made
    generate choose another token than the highest logit, the documented loop
    (``c[c.recovery.argmax(0)]``) asks for the highest one: it is solved in the same pass, at
    the cost of one more target instead of one more pass."""
    # generate's own raw logits are the stock logits the decomposition is checked against
    # (before a final soft-cap they are not: then target mode runs one plain forward instead).
    wanted_logits = kwargs.get("output_logits")
    own_logits = simple and session.family.final_softcap(model) is None  # one row per sequence, each step
    if own_logits:
        kwargs = {**kwargs, "output_logits": True}
    generation = session.generation = Recording()
    # the layers' outputs: the target-mode pass need not compute them again
    capture = sweep.Capture(model, session.family)
    try:
        with capture if simple else contextlib.nullcontext():
            out = original(*args, **kwargs)
    finally:
        session.generation = None
    record = generation.inputs
    reference = torch.stack(out.logits, 1) if own_logits and out.get("logits") is not None else None
    if own_logits and not wanted_logits:
        out["logits"] = None
    sequences = out.sequences
    prompt_ids = prompt_ids_of(args, kwargs)
    prompt = int(prompt_ids.shape[-1])
    if sequences.shape[-1] <= prompt or not record:
        out["attentions"] = ()
        return out
    used = sequences[:, :-1]
    mask, position_ids = _recorded_inputs(record, int(prompt_ids.shape[0]), used)
    inputs = Inputs(used, mask, position_ids, list(range(prompt - 1, used.shape[1])))
    steps = len(inputs.positions)
    targets: list[Target] = [Token(sequences[:, prompt + k]) for k in range(steps)]
    if reference is not None and reference.shape[:2] != (used.shape[0], steps):
        reference = None
    extra = []
    if greedy and reference is not None:
        for step, chosen in enumerate(targets):
            highest = Token(reference[:, step].argmax(-1))
            if highest != chosen:
                extra.append((step, highest))
    replay = capture.outputs(used.shape[1]) if simple else None
    # generate's cache would sit beside the pass (at 8k tokens, a fifth of plain generation's
    # peak) and explains nothing: the decomposed output carries none
    _compat.drop_cache(out)
    out["attentions"] = explain(
        model,
        inputs,
        mode="target",
        targets=targets,
        reference=reference,
        extra=extra,
        replay=replay,
        options=options,
    )
    _mark_tokens(out, prompt)
    return out


def _recorded_inputs(
    record: list[tuple[Any, Any]], batch: int, used: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The attention mask and position ids generate used for each returned sequence.

    generate expands the prompt rows (beams, ``num_return_sequences``) before its first call:
    returned sequence ``r`` comes from prompt row ``r // n`` (``n`` sequences per prompt),
    which is recorded row ``(r // n) * e`` (``e`` rows per prompt). Masks and position ids
    depend on the prompt row only, so any of its expanded rows will do.
    """
    mask, _ = record[0]
    rows = used.shape[0]
    if mask is not None and mask.dim() == 2:
        source = torch.arange(rows, device=mask.device) // (rows // batch) * (mask.shape[0] // batch)
        prompt_mask = mask[source]
        mask = torch.cat([prompt_mask, prompt_mask.new_ones((rows, used.shape[1] - prompt_mask.shape[1]))], 1)
    else:
        mask = None
    positions = [p for _, p in record]
    if all(isinstance(p, torch.Tensor) and p.dim() == 2 for p in positions):
        position_ids = torch.cat(positions, dim=-1)
        if position_ids.shape[-1] == used.shape[-1]:
            source = torch.arange(rows, device=position_ids.device)
            source = source // (rows // batch) * (position_ids.shape[0] // batch)
            return mask, position_ids[source]
    if mask is None:
        return None, None  # one call per token was not made (static cache, assisted decoding)
    return mask, positions_from_mask(mask)
