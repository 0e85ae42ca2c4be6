"""The Hugging Face side: the replacement ``forward`` and ``generate`` of a wrapped model.

They read generate's and forward's options, refuse what cannot be decomposed, and hand the
work to the engines: forward mode runs inside the model's own forward (a
:class:`~llama_attrib.passes.ForwardPass`), target mode decomposes the finished sequence afterwards
(:func:`llama_attrib.engines.explain`). ``scope()`` is the lifecycle's block in which the
model is wrapped; this module never imports the public API.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from . import _compat, families, memory, sweep
from ._compat import CACHE_KEYWORDS, cache_length
from .checks import completeness_error, tolerance
from .composition import LogitComposition
from .engines import MODES, Inputs, Scope, explain
from .errors import DecompositionError, GeneratedTokenWarning, UnsupportedOptionError
from .passes import ForwardPass
from .session import Collecting, Forward, Recording, Session
from .stream import strip


def forward_adapter(session: Session, model: nn.Module, original: Forward, scope: Scope) -> Forward:
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
        mode = _mode(decompose, "forward")
        bound = signature.bind(*args, **kwargs)
        options = _options(bound, signature)
        _check_forward_options(options)
        if mode == "target":
            return _target_forward(model, original, bound, options, scope)
        _set_option(bound, signature, "output_attentions", False)
        cache = next((options[k] for k in CACHE_KEYWORDS if options.get(k) is not None), None)
        expected = generation.expected_length if isinstance(generation, Collecting) else 0
        if not isinstance(generation, Collecting):  # a single forward (inside generate, generate checked)
            batch, length = options["input_ids"].shape
            families.check_length(model, cache_length(cache) + length)
            _check_fits(model, cache_length(cache) + length, batch, "forward", None, session.dtype)
        active = ForwardPass(session.dtype, offset=cache_length(cache), expected_length=expected)
        with session.running(active):
            out = original(*bound.args, **bound.kwargs)
        return _attach(session, active, model, out, options.get("attention_mask"))

    return forward


def _check_fits(
    model: nn.Module, length: int, batch: int, mode: str, max_memory: Any, dtype: torch.dtype
) -> None:
    """Forward mode keeps every component at once: refuse, before starting, what cannot fit."""
    device = next(model.parameters()).device
    needed = memory.estimate(model, length, batch=batch, mode=mode, dtype=dtype)
    limit = memory.budget(max_memory, device)
    if needed > limit:
        raise memory.MemoryBudgetError(
            f"forward-mode decomposition of {batch} x {length} tokens needs about "
            f"{memory.fmt(needed)}; the budget is {memory.fmt(limit)} (max_memory, default 80% of "
            "the free memory). Use decompose=True (target mode: memory does not grow with the "
            "number of components), or llama_attrib.decompose_sequence(..., mode='forward'), "
            "which processes components in chunks that fit"
        )


def _mode(decompose: bool | str | None, default: str) -> str:
    """``True``/``None`` -> the call's default mode; a string must name a mode."""
    if decompose is True or decompose is None:
        return default
    if decompose in MODES:
        return str(decompose)
    raise UnsupportedOptionError(f"decompose must be True, False or one of {MODES}, not {decompose!r}")


def _record(generation: Recording, signature: inspect.Signature, args: Any, kwargs: dict[str, Any]) -> None:
    """Keep the attention mask and position ids generate passes (target-mode generation)."""
    options = _options(signature.bind(*args, **kwargs), signature)
    generation.inputs.append((options.get("attention_mask"), options.get("position_ids")))


def _target_forward(
    model: nn.Module, original: Forward, bound: inspect.BoundArguments, options: dict[str, Any], scope: Scope
) -> Any:
    """A forward with ``decompose="target"``: the real output, then the last position's target."""
    cache = next((options[k] for k in CACHE_KEYWORDS if options.get(k) is not None), None)
    if cache_length(cache):
        raise UnsupportedOptionError(
            'decompose="target" decomposes a whole sequence: call it without a filled cache, or use '
            "decompose=True (forward mode) to continue a cached decomposition"
        )
    out = original(*bound.args, **bound.kwargs)
    ids = options["input_ids"]
    mask = options.get("attention_mask")
    last = _last_real(mask, int(ids.shape[-1]))
    inputs = Inputs(ids, mask, options.get("position_ids"), [int(ids.shape[-1]) - 1], last)
    (composition,) = explain(model, scope, inputs, mode="target")
    out["attentions"] = composition
    return out


def _attach(session: Session, active: ForwardPass, model: nn.Module, out: Any, mask: Any = None) -> Any:
    """Put the last position's LogitComposition in ``out["attentions"]``."""
    head = active.head
    if head is None:
        raise DecompositionError("the decomposed forward never reached the LM head")
    real, comps, residual = head
    tol = tolerance(real.dtype)
    checked_real, checked = real, comps if residual is None else torch.cat([comps, residual[None]])
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= real.shape[1]:
        # Padding positions attend to nothing real (their outputs are whatever the attention
        # kernel makes of a fully masked row) and feed no other position: not checked.
        valid = mask[:, mask.shape[-1] - real.shape[1] :].bool().to(real.device)
        checked_real, checked = real[valid], checked[:, valid]
    if not bool(torch.isfinite(checked_real).all()):
        session.caches.clear()
        raise DecompositionError(
            "the model's own hidden state is not finite (NaN or inf) on this input: the model "
            "overflows by itself (float16 often does; try bfloat16 or float32), not llama_attrib"
        )
    err = completeness_error(checked_real, checked)
    if not err <= tol:
        session.caches.clear()
        raise DecompositionError(
            f"components do not add up to the final hidden state (relative error {err:.2e} > "
            f"{tol:.0e}); an operation outside llama_attrib's rules changed the hidden state"
        )
    for key in ("hidden_states", "last_hidden_state"):
        if out.get(key) is not None:
            out[key] = strip(out[key])
    stock = active.logits if active.logits is not None else out["logits"]
    res = None if residual is None else residual[:, -1].detach()
    hidden, logits, capped = comps[:, :, -1].detach(), stock[:, -1], out["logits"][:, -1]
    last = _last_real(mask, comps.shape[2])
    if last is not None and stock.shape[1] == comps.shape[2]:
        # Right padding: each row's composition is at its last real token, not at a pad.
        rows = torch.arange(comps.shape[1], device=comps.device)
        at = last.to(comps.device)
        hidden, logits, capped = comps[:, rows, at].detach(), stock[rows, last], out["logits"][rows, last]
        res = None if residual is None else residual[rows, at].detach()
    if hidden.shape[1] == 1:
        hidden, logits, capped = hidden[:, 0], logits[0], capped[0]
        res = None if res is None else res[0]
    weight = session.family.head_weight(model)
    composition = LogitComposition(hidden, weight.detach(), logits, residual=res)
    if session.family.final_softcap(model) is not None:
        composition.capped = capped
    out["attentions"] = composition
    if isinstance(session.generation, Collecting):
        session.generation.steps.append(composition)
    return out


def _last_real(mask: Any, length: int) -> torch.Tensor | None:
    """Each row's last attended position, when a 2D mask right-pads some row; else None."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[-1] != length:
        return None
    if bool(mask[:, -1].all()):
        return None
    return length - 1 - mask.flip(-1).long().argmax(-1)


def _options(bound: inspect.BoundArguments, signature: inspect.Signature) -> dict[str, Any]:
    """All arguments of a bound call, with the ``**kwargs`` ones flattened in."""
    options = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            options.update(options.pop(name, {}))
    return options


def _set_option(bound: inspect.BoundArguments, signature: inspect.Signature, key: str, value: Any) -> None:
    if key in signature.parameters:
        bound.arguments[key] = value
        return
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            bound.arguments.setdefault(name, {})[key] = value


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


# Options of a target-mode generate that are llama_attrib's, not generate's.
_SEQUENCE_OPTIONS = ("component_dtype", "max_memory", "progress")

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


def generate_adapter(session: Session, model: nn.Module, original: Forward, scope: Scope) -> Forward:
    generation_config = getattr(getattr(original, "__self__", None), "generation_config", None)

    def generate(*args: Any, decompose: bool | str | None = None, **kwargs: Any) -> Any:
        with session.lock:  # one call at a time: a decomposing call changes how the model runs
            return run(*args, decompose=decompose, **kwargs)

    def run(*args: Any, decompose: bool | str | None = None, **kwargs: Any) -> Any:
        if not session.wants(decompose):
            return original(*args, **kwargs)
        mode = _mode(decompose, "target")
        if kwargs.get("return_dict_in_generate") is False:
            raise UnsupportedOptionError(
                "decompose=True returns one Composition per generated token in "
                "out['attentions']: call with return_dict_in_generate=True"
            )
        kwargs = {**kwargs, "return_dict_in_generate": True, "output_attentions": False}
        if session.generation is not None:
            raise DecompositionError("a decomposed generate was called from inside another one")
        options = {k: kwargs.pop(k) for k in _SEQUENCE_OPTIONS if k in kwargs}
        families.check_length(model, _expected_length(generation_config, args, kwargs))
        if mode == "target":
            # one row of generate's logits per returned sequence and step: no beams, no drafts
            simple = not any(
                _REFUSED_GENERATION[key][0](_generation_option(generation_config, kwargs, key))
                for key in ("num_beams", "assistant_model", "prompt_lookup_num_tokens")
            )
            greedy = simple and not _generation_option(generation_config, kwargs, "do_sample")
            return _generate_target(session, model, original, args, kwargs, options, scope, simple, greedy)
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
        if set(options) - {"max_memory"}:
            raise UnsupportedOptionError(
                f"{sorted(set(options) - {'max_memory'})} apply to target mode: use decompose=True, or "
                "llama_attrib.decompose_sequence(..., mode='forward') on the finished sequence"
            )
        expected = _expected_length(generation_config, args, kwargs)
        if expected:
            batch = int(_prompt_ids(args, kwargs).shape[0])
            _check_fits(model, expected, batch, "generate", options.get("max_memory"), session.dtype)
        generation = session.generation = Collecting(expected)
        try:
            out = original(*args, **kwargs)
        finally:
            session.generation = None
            session.caches.clear()
        out["attentions"] = tuple(generation.steps)
        _mark_tokens(out, int(_prompt_ids(args, kwargs).shape[-1]))
        return out

    return generate


def _mark_tokens(out: Any, prompt: int) -> None:
    """Give each step's Composition the token generate actually produced (``c.token``: an int,
    or one per row), and say once when it is not the argmax of the logits the step explains
    (a logits processor, ``repetition_penalty`` or sampling chose it): then the seed's
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
    options: dict[str, Any],
    scope: Scope,
    simple: bool = False,
    greedy: bool = False,
) -> Any:
    """Plain generation (recording the masks and positions it used), then one target-mode pass.

    ``greedy``: where a logits processor (``min_new_tokens``, ``repetition_penalty``, ...) made
    generate choose another token than the highest logit, the seed's loop
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
    prompt_ids = _prompt_ids(args, kwargs)
    prompt = int(prompt_ids.shape[-1])
    if sequences.shape[-1] <= prompt or not record:
        out["attentions"] = ()
        return out
    used = sequences[:, :-1]
    mask, position_ids = _recorded_inputs(record, int(prompt_ids.shape[0]), used)
    inputs = Inputs(used, mask, position_ids, list(range(prompt - 1, used.shape[1])))
    steps = len(inputs.positions)
    targets = [("token", tuple(int(t) for t in sequences[:, prompt + k].tolist())) for k in range(steps)]
    if reference is not None and reference.shape[:2] != (used.shape[0], steps):
        reference = None
    also = []
    if greedy and reference is not None:
        for step, (_, chosen) in enumerate(targets):
            highest = tuple(int(t) for t in reference[:, step].argmax(-1).tolist())
            if highest != chosen:
                also.append((step, ("token", highest)))
    replay = capture.outputs(used.shape[1]) if simple else None
    # generate's cache would sit beside the pass (at 8k tokens, a fifth of plain generation's
    # peak) and explains nothing: the decomposed output carries none
    _compat.drop_cache(out)
    out["attentions"] = explain(
        model,
        scope,
        inputs,
        mode="target",
        targets=targets,
        reference=reference,
        also=also,
        replay=replay,
        **options,
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
    return mask, (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _prompt_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor):
        raise UnsupportedOptionError("decompose=True needs the prompt's input_ids as a tensor")
    return ids
