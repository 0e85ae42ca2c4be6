"""``attribute(model, tokenizer, prompt)``: generate, decompose every step, return a result.

One call of ``model.generate(..., decompose=mode)`` inside :func:`llama_attrib.decompose`,
so a model that was not wrapped is unwrapped again afterwards (also on an error) and a
wrapped one stays wrapped. Only the Composition interface common to every mode is read:
``c[token].components``, ``c.logits``.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .api import decompose, decompose_sequence, is_wrapped
from .composition import LOGPROB, SHARES, Contributions, target_value
from .errors import DecompositionError, GeneratedTokenWarning, UnsupportedOptionError
from .result import Attribution
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
        raise TypeError("prompt: a string, or chat messages [{'role': ..., 'content': ...}] (one sequence)")
    if isinstance(prompt, str) and not chat:
        ids: torch.Tensor = tokenizer(prompt, return_tensors="pt")["input_ids"]
        return ids
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if chat is False:
        raise ValueError("chat=False with chat messages: pass a string, or chat messages without chat=False")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
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
    prompt: str | Messages,
    max_new_tokens: int = 8,
    *,
    chat: bool | None = None,
    mode: bool | str = True,
    progress: bool = False,
    response: str | None = None,
    contrast: int | str | None = None,
    target: str = "logit",
    **generate_kwargs: Any,
) -> Attribution:
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
    """
    reserved = sorted(k for k in _RESERVED if k in generate_kwargs)
    if reserved:
        raise UnsupportedOptionError(f"attribute() sets {', '.join(reserved)} itself")
    if target not in ("logit", "logprob"):
        raise UnsupportedOptionError(f"target must be 'logit' or 'logprob', not {target!r}")
    if contrast is not None and target != "logit":
        raise UnsupportedOptionError("contrast= compares two logits: use it with target='logit'")
    ids = encode(tokenizer, prompt, chat)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, Any] = {"do_sample": False, "pad_token_id": pad, "use_cache": True, **generate_kwargs}
    if response is not None or contrast is not None or target != "logit":
        explained = _Explained(prompt, chat, mode, max_new_tokens, response, contrast, target)
        return _attribute_sequence(model, tokenizer, ids.to(device), options, explained)
    streamer = _Progress(max_new_tokens) if progress and "streamer" not in options else None
    # attribute() explains the generated token itself, whatever chose it: no warning needed.
    with torch.no_grad(), decompose(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", GeneratedTokenWarning)
        generate: Any = model.generate  # the wrapped one: look it up inside the block
        out = generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            decompose=mode,
            return_dict_in_generate=True,
            output_attentions=True,
            max_new_tokens=max_new_tokens,
            **({"streamer": streamer} if streamer else {}),
            **options,
        )
    result = _result(out, ids.shape[1], tokenizer, model, prompt, chat, mode, max_new_tokens, options)
    result._model = model  # type: ignore[attr-defined]  # for result.flow(step); not saved or compared
    return result


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
        with torch.no_grad():
            out = generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=explained.max_new_tokens,
                **plain,
                **options,
            )
        sequence = out.sequences if hasattr(out, "sequences") else out
    if sequence.shape[1] <= p:
        raise DecompositionError("the model generated no token after the prompt")
    answer_ids = sequence[0, p:]
    other = None if explained.contrast is None else _token_id(tokenizer, explained.contrast)
    targets: Any = "logprob" if explained.target == "logprob" else None
    if other is not None:
        targets = (answer_ids, other)
    mode = "forward" if explained.mode == "forward" else "target"
    steps = decompose_sequence(model, sequence, p, mode=mode, targets=targets)
    rows = []
    what: Any  # what each row explains: a token, a pair, or the log-probability target
    for k, c in enumerate(steps):
        token = int(answer_ids[k])
        if explained.target == "logprob":
            contributions, what = c.logprob(token), (LOGPROB, token)
        elif other is not None:
            contributions, what = _difference(c, token, other), (token, other)
        else:
            contributions, what = c[token], token
        rows.append((contributions, float(target_value(c.logits, what))))
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


def _difference(c: Any, a: int, b: int) -> Any:
    """The components of ``logit_a - logit_b`` of one step."""
    if hasattr(c, "contrast"):
        return c.contrast(a, b)
    first, second = c[a], c[b]
    shares = [first.shares[n] - second.shares[n] for n in SHARES] if hasattr(first, "shares") else None
    if shares is None:
        return Contributions.of(first.components - second.components, first.residual - second.residual)
    return Contributions.of(first.components - second.components, shares=torch.stack(shares, -1))


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
    bias = np.zeros(len(rows), dtype=np.float32)
    rounding = np.zeros(len(rows), dtype=np.float32)
    for k, (contributions, value) in enumerate(rows):
        components = contributions.components.detach().float().cpu().numpy()
        bias[k] = float(contributions.residual)
        shares = getattr(contributions, "shares", None)
        rounding[k] = 0.0 if shares is None else float(shares["rounding"])
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
        "generate": {k: _jsonable(v) for k, v in options.items() if k != "streamer"},
        **recorded,
    }
    return Attribution(
        tokens=texts,
        token_ids=sequence,
        prompt_length=p,
        token_scores=scores,
        logits=logits,
        bias=bias,
        rounding=rounding,
        pieces=pieces,
        special=special,
        options=options_recorded,
        versions=_versions(model),
    )


def _jsonable(value: Any) -> Any:
    """The value if JSON can hold it, else its repr (a GenerationConfig, a tensor, ...)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _versions(model: nn.Module) -> dict[str, str]:
    from . import __version__

    versions = {"llama_attrib": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "pydec"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    config = getattr(model, "config", None)
    versions["model"] = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    versions["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return versions


__all__ = ["attribute", "encode"]
