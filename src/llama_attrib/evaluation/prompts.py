"""The evaluation prompt set shipped with llama_attrib, and how a prompt becomes token ids.

``prompts.jsonl`` (package data) holds one JSON object per line, written for this project:

- ``id``: ``<category>-<nn>``; ``category``: one of :data:`CATEGORIES`;
- ``chat``: whether the prompt is a user message to be wrapped in the chat template;
- ``prompt``: the text (the user message when ``chat``);
- ``answer`` (optional): the expected continuation;
- ``source`` and ``source_start`` (optional, ground truth): the span of ``prompt`` the answer
  is copied from, as text and character offset (``prompt[start:start+len(source)] == source``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import Tensor

CATEGORIES = ("factual", "copying", "arithmetic", "instruction", "long")


@dataclass(frozen=True)
class Prompt:
    """One line of ``prompts.jsonl``."""

    id: str
    category: str
    prompt: str
    chat: bool = False
    answer: str | None = None
    source: str | None = None
    source_start: int | None = None

    @property
    def source_span(self) -> tuple[int, int] | None:
        """Character span ``[start, end)`` of the ground-truth source in ``prompt``, if any."""
        if self.source is None or self.source_start is None:
            return None
        return self.source_start, self.source_start + len(self.source)


def load_prompts(path: str | None = None) -> list[Prompt]:
    """The shipped prompt set (or the JSONL file at ``path``)."""
    if path is None:
        text = resources.files(__package__).joinpath("prompts.jsonl").read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return [Prompt(**json.loads(line)) for line in text.splitlines() if line.strip()]


def spread(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    """At most ``limit`` prompts, taken round-robin over the categories (all if ``None``)."""
    if limit is None or limit >= len(prompts):
        return prompts
    by_category = [[p for p in prompts if p.category == c] for c in CATEGORIES]
    chosen: list[Prompt] = []
    for i in range(max(len(group) for group in by_category)):
        chosen += [group[i] for group in by_category if i < len(group)]
    return chosen[:limit]


@dataclass(frozen=True)
class Encoded:
    """A prompt as model input: ``ids`` ``[T]`` and the token positions of its source span."""

    ids: Tensor
    source_positions: list[int]


def encode(prompt: Prompt, tokenizer: Any) -> Encoded:
    """Tokenize (through the chat template when ``prompt.chat``) and locate the source span.

    A token belongs to the source span when its character range overlaps the span's.
    """
    text, offset = prompt.prompt, 0
    if prompt.chat:
        messages = [{"role": "user", "content": prompt.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        offset = text.index(prompt.prompt)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not prompt.chat)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    positions: list[int] = []
    span = prompt.source_span
    if span is not None:
        start, end = span[0] + offset, span[1] + offset
        positions = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > start]
    return Encoded(ids, positions)
