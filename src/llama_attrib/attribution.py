"""``attribute(model, tokenizer, prompt)``: generate, decompose every step, return a result.

One call of ``model.generate(..., decompose=mode)`` inside :func:`llama_attrib.decompose`,
so a model that was not wrapped is unwrapped again afterwards (also on an error) and a
wrapped one stays wrapped. Only the Composition interface common to every mode is read:
``c[token].components``, ``c.logits``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import families
from ._saving import jsonable, versions
from .api import decompose, decompose_sequence, is_wrapped
from .composition import SHARES, Contributions
from .engines import Options
from .errors import DecompositionError, GeneratedTokenWarning, UnsupportedOptionError
from .result import Attribution
from .targets import Contrast, LogProb, Target, Token
from .tokens import piece_texts

Messages = Sequence[Mapping[str, str]]

# generate options that attribute() sets itself: the result depends on them.
_RESERVED = (
    "decompose",
    "return_dict_in_generate",
    "output_attentions",
    "input_ids",
    "inputs",
    "attention_mask",
)


def encode(tokenizer: Any, prompt: str | Messages, chat: bool | None = None) -> torch.Tensor:
    """Prompt ids ``[1, P]``: plain text as is (with the tokenizer's BOS), or chat messages
    (or text with ``chat=True``, as one user message) through the chat template."""
    if not isinstance(prompt, str) and not all(isinstance(m, Mapping) for m in prompt):
        raise TypeError(
            "prompt: a string, chat messages [{'role': ..., 'content': ...}], or a list of either"
        )
    if isinstance(prompt, str) and not chat:
        ids: torch.Tensor = tokenizer(prompt, return_tensors="pt")["input_ids"]
        return _nonempty(ids)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if chat is False:
        raise ValueError("chat=False with chat messages: pass a string, or chat messages without chat=False")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return _nonempty(ids)


def _nonempty(ids: torch.Tensor) -> torch.Tensor:
    if ids.shape[-1] == 0:
        raise UnsupportedOptionError("the prompt is empty (no token): give some text")
    return ids


class _Progress:
    """A generate streamer that advances a tqdm bar (on stderr) per generated token."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="decomposing", unit="token", file=sys.stderr, leave=False)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first sends the prompt
            self.prompt_seen = True
            return
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def attribute(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Messages | Sequence[str | Messages],
    max_new_tokens: int = 8,
    *,
    chat: bool | None = None,
    mode: bool | str = True,
    progress: bool = False,
    response: str | None = None,
    contrast: int | str | None = None,
    target: str = "logit",
    batch_size: int = 8,
    **generate_kwargs: Any,
) -> Any:
    """Generate from ``prompt`` (or take ``response``) and decompose every answer token's logit.

    ``prompt``: text, or chat messages ``[{"role": ..., "content": ...}]`` (the tokenizer's
    chat template is applied; ``chat=True`` does it for text too). ``mode`` is passed on as
    ``generate(decompose=mode)``. Greedy by default; any other ``generate`` option
    (``do_sample``, ``temperature``, ``generation_config``, ...) goes through. With
    sampling, the token that was actually sampled is the one explained. One sequence.

    ``response``: explain this text as the answer (teacher-forced after the prompt) instead of
    a new generation. ``contrast``: a token (id, or text that is one token) whose logit each
    step's is compared with: each row explains ``logit(token) - logit(contrast)``.
    ``target="logprob"``: each row explains the token's logit minus the probability-weighted
    mean logit of its step, ``z_t - sum_j p_j z_j`` with the probabilities frozen: an exact
    linear target whose rows add up to ``log p_t + H(p)`` (the log-probability the
    faithfulness metrics measure, plus the step's entropy, which no token owns).

    Several prompts: a list of texts or of chats gives a list of Attributions, each equal to
    its prompt's own (tested to 1e-5); ``batch_size`` prompts are generated and decomposed
    together (left-padded; a row stops at its end-of-sequence token as it would alone).
    With ``response``, ``contrast`` or ``target`` they are explained one at a time.
    """
    if _several(prompt):
        how: dict[str, Any] = {"chat": chat, "mode": mode, "progress": progress, "response": response}
        how |= {"contrast": contrast, "target": target}
        return _attribute_several(
            model, tokenizer, list(prompt), max_new_tokens, batch_size, how, generate_kwargs
        )
    one: Any = prompt  # one text or one chat
    if max_new_tokens < 1:
        raise UnsupportedOptionError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if target not in ("logit", "logprob"):
        raise UnsupportedOptionError(f"target must be 'logit' or 'logprob', not {target!r}")
    if contrast is not None and target != "logit":
        raise UnsupportedOptionError("contrast= compares two logits: use it with target='logit'")
    ids = encode(tokenizer, one, chat)
    options = _generate_options(tokenizer, generate_kwargs)
    if response is not None or contrast is not None or target != "logit":
        explained = _Explained(one, chat, mode, max_new_tokens, response, contrast, target)
        return _attribute_sequence(model, tokenizer, ids.to(families.input_device(model)), options, explained)
    streamer = _Progress(max_new_tokens) if progress and "streamer" not in options else None
    extra = {"streamer": streamer} if streamer else {}
    out = _generate(model, ids, torch.ones_like(ids), mode, max_new_tokens, {**options, **extra})
    result = _result(out, ids.shape[1], tokenizer, model, one, chat, mode, max_new_tokens, options)
    result._model = model  # type: ignore[attr-defined]  # for result.flow(step); not saved or compared
    return result


def _several(prompt: Any) -> bool:
    """A list of prompts (texts or chats), not one text or one chat (a list of messages)."""
    if isinstance(prompt, str | Mapping) or not isinstance(prompt, Sequence) or not prompt:
        return False
    return all(
        isinstance(p, str) or (isinstance(p, Sequence) and all(isinstance(m, Mapping) for m in p))
        for p in prompt
    )


def _attribute_several(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[Any],
    max_new_tokens: int,
    batch_size: int,
    how: dict[str, Any],
    generate_kwargs: dict[str, Any],
) -> list[Attribution]:
    """:func:`attribute` of each prompt: generated and decomposed ``batch_size`` at a time."""
    if batch_size < 1:
        raise UnsupportedOptionError(f"batch_size must be at least 1, not {batch_size}")
    single = how["response"] is not None or how["contrast"] is not None or how["target"] != "logit"
    if single or batch_size == 1:
        return [attribute(model, tokenizer, p, max_new_tokens, **how, **generate_kwargs) for p in prompts]
    from tqdm.auto import tqdm

    options = _generate_options(tokenizer, generate_kwargs, also=("streamer",))  # one row at a time
    pad = options["pad_token_id"]
    stops = _eos_ids(model, options)
    results: list[Attribution] = []
    bar = tqdm(
        total=len(prompts), unit="prompt", desc="decomposing", disable=not how["progress"], file=sys.stderr
    )
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [encode(tokenizer, p, how["chat"])[0] for p in chunk]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(encoded):  # left padding, as generation needs
            ids[r, width - len(e) :], mask[r, width - len(e) :] = e, 1
        out = _generate(model, ids, mask, how["mode"], max_new_tokens, options)
        steps = out["attentions"]
        for r, (prompt, e) in enumerate(zip(chunk, encoded, strict=True)):
            generated = [int(t) for t in out.sequences[r, width : width + len(steps)]]
            n = next((k + 1 for k, t in enumerate(generated) if t in stops), len(generated))
            rows = []
            for k in range(n):
                c, token = steps[k], generated[k]
                parts = c[token] if len(chunk) == 1 else c[r, token]
                logit = c.logits[token] if len(chunk) == 1 else c.logits[r, token]
                kept = parts.components[width - len(e) :]  # the pad positions' are exactly zero
                rows.append((Contributions.of(kept, shares=Contributions.shares_of(parts)), float(logit)))
            explained = _Explained(prompt, how["chat"], how["mode"], max_new_tokens, None, None, "logit")
            sequence = [int(t) for t in e] + generated[:n]
            result = _assemble(sequence, len(e), rows, tokenizer, model, explained, options, {})
            result._model = model  # type: ignore[attr-defined]
            results.append(result)
            bar.update(1)
    bar.close()
    return results


def _generate_options(
    tokenizer: Any, generate_kwargs: dict[str, Any], also: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``generate``'s options: greedy, with the cache and a pad token, then the caller's (none of
    those :func:`attribute` sets itself, nor ``also``)."""
    reserved = sorted(k for k in (*_RESERVED, *also) if k in generate_kwargs)
    if reserved:
        raise UnsupportedOptionError(f"attribute() sets {', '.join(reserved)} itself")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"do_sample": False, "pad_token_id": pad, "use_cache": True, **generate_kwargs}


def _generate(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    mode: bool | str,
    max_new_tokens: int,
    options: Any,
) -> Any:
    """A decomposing generate of ``ids`` on the model's device (wrapped for the call)."""
    device = families.input_device(model)
    # attribute() explains the generated token itself, whatever chose it: no warning needed.
    with torch.no_grad(), decompose(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", GeneratedTokenWarning)
        generate: Any = model.generate  # the wrapped one: look it up inside the block
        return generate(
            ids.to(device),
            attention_mask=mask.to(device),
            decompose=mode,
            return_dict_in_generate=True,
            output_attentions=True,
            max_new_tokens=max_new_tokens,
            **options,
        )


def _eos_ids(model: nn.Module, options: dict[str, Any]) -> set[int]:
    """The tokens that end a row's generation."""
    eos = options.get("eos_token_id")
    if eos is None:
        config = options.get("generation_config") or getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(t) for t in (eos if isinstance(eos, list | tuple) else [eos])}


@dataclass(frozen=True)
class _Explained:
    """What :func:`attribute` was asked to explain, beyond the prompt's ids."""

    prompt: str | Messages
    chat: bool | None
    mode: bool | str
    max_new_tokens: int
    response: str | None
    contrast: int | str | None
    target: str


def _attribute_sequence(
    model: nn.Module, tokenizer: Any, ids: torch.Tensor, options: dict[str, Any], explained: _Explained
) -> Attribution:
    """The answer (``response``, or a plain generation), then one pass over the whole sequence
    for the asked targets (:func:`llama_attrib.decompose_sequence`)."""
    p = int(ids.shape[1])
    if explained.response is not None:
        answer = tokenizer(explained.response, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if answer.shape[1] == 0:
            raise UnsupportedOptionError("response= is empty: give the text to explain")
        sequence = torch.cat([ids, answer.to(ids.device)], 1)
    else:
        generate: Any = model.generate
        plain = {"decompose": False} if is_wrapped(model) else {}  # one pass afterwards, not two
        generation = {k: v for k, v in options.items() if k not in Options.names()}
        with torch.no_grad():
            out = generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=explained.max_new_tokens,
                **plain,
                **generation,
            )
        sequence = out.sequences if hasattr(out, "sequences") else out
    if sequence.shape[1] <= p:
        raise DecompositionError("the model generated no token after the prompt")
    answer_ids = sequence[0, p:]
    other = None if explained.contrast is None else _token_id(tokenizer, explained.contrast)
    targets = [_step_target(explained.target, int(token), other) for token in answer_ids]
    mode = "forward" if explained.mode == "forward" else "target"
    sequence_options = {k: options[k] for k in Options.names() if k in options}
    steps = decompose_sequence(model, sequence, p, mode=mode, targets=targets, **sequence_options)
    rows = [
        (c.explain(target), float(target.value(c.logits[None])[0]))
        for target, c in zip(targets, steps, strict=True)
    ]
    recorded = {"response": explained.response, "contrast": explained.contrast, "target": explained.target}
    return _assemble(
        [int(t) for t in sequence[0].tolist()], p, rows, tokenizer, model, explained, options, recorded
    )


def _token_id(tokenizer: Any, token: int | str) -> int:
    if isinstance(token, int):
        return token
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UnsupportedOptionError(f"contrast={token!r} is {len(ids)} tokens: give one token (or its id)")
    return int(ids[0])


def _step_target(target: str, token: int, other: int | None) -> Target:
    """What one step of ``attribute(target=..., contrast=...)`` explains about ``token``."""
    if target == "logprob":
        return LogProb(token)
    return Token(token) if other is None else Contrast(token, other)


def _result(
    out: Any,
    p: int,
    tokenizer: Any,
    model: nn.Module,
    prompt: str | Messages,
    chat: bool | None,
    mode: bool | str,
    max_new_tokens: int,
    options: dict[str, Any],
) -> Attribution:
    steps = out["attentions"]
    sequence = [int(t) for t in out.sequences[0, : p + len(steps)]]
    rows = [(c[sequence[p + k]], float(c.logits[sequence[p + k]])) for k, c in enumerate(steps)]
    explained = _Explained(prompt, chat, mode, max_new_tokens, None, None, "logit")
    return _assemble(sequence, p, rows, tokenizer, model, explained, options, {})


def _assemble(
    sequence: list[int],
    p: int,
    rows: list[tuple[Any, float]],
    tokenizer: Any,
    model: nn.Module,
    explained: _Explained,
    options: dict[str, Any],
    recorded: dict[str, Any],
) -> Attribution:
    """The result of one sequence: ``rows``, each step's contributions and the value they
    explain (a logit, a difference of two, or the log-probability target)."""
    sequence = sequence[: p + len(rows)]
    scores = np.full((len(rows), max(p + len(rows) - 1, 0)), np.nan, dtype=np.float32)
    logits = np.zeros(len(rows), dtype=np.float32)
    shares = np.zeros((len(rows), len(SHARES)), dtype=np.float32)  # by name, SHARES' order
    for k, (contributions, value) in enumerate(rows):
        components = contributions.components.detach().float().cpu().numpy()
        shares[k] = Contributions.shares_of(contributions).detach().float().cpu().numpy()
        if components.shape != (p + k,):
            raise DecompositionError(f"step {k}: {components.shape} components, expected ({p + k},)")
        scores[k, : p + k] = components
        logits[k] = value
    texts, pieces, special = piece_texts(tokenizer, sequence)
    prompt = explained.prompt
    options_recorded = {
        "prompt": prompt if isinstance(prompt, str) else [dict(m) for m in prompt],
        "chat": explained.chat,
        "mode": explained.mode,
        "max_new_tokens": explained.max_new_tokens,
        "generate": {k: jsonable(v) for k, v in options.items() if k != "streamer"},
        **recorded,
    }
    return Attribution(
        tokens=texts,
        token_ids=sequence,
        prompt_length=p,
        token_scores=scores,
        logits=logits,
        bias=shares[:, SHARES.index("bias")],
        rounding=shares[:, SHARES.index("rounding")],
        unassigned=shares[:, SHARES.index("unassigned")],
        pieces=pieces,
        special=special,
        options=options_recorded,
        versions=versions(model),
    )


__all__ = ["attribute", "encode"]
