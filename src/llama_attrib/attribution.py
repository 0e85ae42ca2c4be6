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
from typing import Any

import numpy as np
import torch
from torch import nn

from .api import decompose
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
    **generate_kwargs: Any,
) -> Attribution:
    """Generate from ``prompt`` and decompose every generated token's logit.

    ``prompt``: text, or chat messages ``[{"role": ..., "content": ...}]`` (the tokenizer's
    chat template is applied; ``chat=True`` does it for text too). ``mode`` is passed on as
    ``generate(decompose=mode)``. Greedy by default; any other ``generate`` option
    (``do_sample``, ``temperature``, ``generation_config``, ...) goes through. With
    sampling, the token that was actually sampled is the one explained. One sequence.
    """
    reserved = sorted(k for k in _RESERVED if k in generate_kwargs)
    if reserved:
        raise UnsupportedOptionError(f"attribute() sets {', '.join(reserved)} itself")
    ids = encode(tokenizer, prompt, chat)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, Any] = {"do_sample": False, "pad_token_id": pad, "use_cache": True, **generate_kwargs}
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
    scores = np.full((len(steps), max(p + len(steps) - 1, 0)), np.nan, dtype=np.float32)
    logits = np.zeros(len(steps), dtype=np.float32)
    bias = np.zeros(len(steps), dtype=np.float32)
    for k, c in enumerate(steps):
        token = sequence[p + k]
        contributions = c[token]
        components = contributions.components.detach().float().cpu().numpy()
        bias[k] = float(contributions.residual)
        if components.shape != (p + k,):
            raise DecompositionError(f"step {k}: {components.shape} components, expected ({p + k},)")
        scores[k, : p + k] = components
        logits[k] = float(c.logits[token])
    texts, pieces, special = piece_texts(tokenizer, sequence)
    recorded = {
        "prompt": prompt if isinstance(prompt, str) else [dict(m) for m in prompt],
        "chat": chat,
        "mode": mode,
        "max_new_tokens": max_new_tokens,
        "generate": {k: _jsonable(v) for k, v in options.items() if k != "streamer"},
    }
    return Attribution(
        tokens=texts,
        token_ids=sequence,
        prompt_length=p,
        token_scores=scores,
        logits=logits,
        bias=bias,
        pieces=pieces,
        special=special,
        options=recorded,
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
