"""Token text pieces and word boundaries, for byte-level BPE and SentencePiece alike.

Byte-level BPE (GPT-2, Llama 3, SmolLM2) marks a leading space with ``Ġ`` in its raw pieces
and keeps it when one token is decoded (``" France"``). SentencePiece (Llama 1/2, Mistral)
marks it with ``▁`` and drops it when one token is decoded (``"France"``). Both are read
here from the raw piece, so that the text pieces concatenate to the text and a word starts
wherever a piece starts with a space.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

# Raw-piece markers of a leading space (SentencePiece, byte-level BPE) and a newline.
_SPACE_MARKERS = ("▁", "Ġ")
_NEWLINE_MARKERS = ("Ċ", "<0x0A>")


def piece_texts(tokenizer: Any, ids: Sequence[int]) -> tuple[list[str], list[str], list[bool]]:
    """``(texts, pieces, special)`` of every token: decoded text (leading space kept), raw
    tokenizer piece, and whether it is a special token (BOS, chat markers)."""
    pieces = [str(p) for p in tokenizer.convert_ids_to_tokens(list(ids))]
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = []
    for token_id, piece in zip(ids, pieces, strict=True):
        text = tokenizer.decode([token_id])
        if piece.startswith("▁") and not text.startswith((" ", "▁")):
            text = " " + text  # SentencePiece's decode drops the leading space of one token
        texts.append(text)
    return texts, pieces, [int(i) in special_ids for i in ids]


def starts_word(text: str, piece: str = "") -> bool:
    """Whether a token begins a new word: its text or raw piece starts with a space or newline."""
    return text[:1].isspace() or piece.startswith(_SPACE_MARKERS + _NEWLINE_MARKERS)


def word_groups(
    texts: Sequence[str],
    pieces: Sequence[str] | None = None,
    special: Sequence[bool] | None = None,
    *,
    breaks: Sequence[int] = (),
) -> list[list[int]]:
    """Positions grouped into words: ``[[0], [1, 2], ...]``.

    A new word starts at a piece that starts with a space or a newline (decoded, or ``▁``/``Ġ``
    in the raw piece), at a special token and right after one, right after a piece that
    ends with a newline, and at every position in ``breaks`` (e.g. where the generation
    starts).
    """
    pieces = pieces if pieces is not None else [""] * len(texts)
    special = special if special is not None else [False] * len(texts)
    groups: list[list[int]] = []
    for i, (text, piece) in enumerate(zip(texts, pieces, strict=True)):
        new = (
            not groups
            or starts_word(text, piece)
            or special[i]
            or special[i - 1]
            or texts[i - 1].endswith("\n")
            or pieces[i - 1].endswith(_NEWLINE_MARKERS)
            or i in breaks
        )
        if new:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def char_offsets(texts: Sequence[str]) -> list[tuple[int, int]]:
    """``(start, end)`` character offsets of every piece in ``"".join(texts)``."""
    offsets, start = [], 0
    for text in texts:
        offsets.append((start, start + len(text)))
        start += len(text)
    return offsets


def tokens_in_span(texts: Sequence[str], start: int, end: int) -> list[int]:
    """Positions of the pieces that overlap the character span ``[start, end)``."""
    return [i for i, (a, b) in enumerate(char_offsets(texts)) if a < end and b > start and b > a]


# A sentence ends at . ! ? (or …) plus closing quotes/brackets, before whitespace and a
# capital, a digit or an opening quote/bracket; or at a line break. Abbreviations such as
# "e.g." or "Dr." followed by a capital are split too: a splitter that needs no download.
_SENTENCE_END = re.compile(r"""(?<=[.!?…])(["')\]]*)\s+(?=["'(\[]?[A-Z0-9À-Ý])|\n+""")
_PARAGRAPH_END = re.compile(r"\n\s*\n")


def text_spans(text: str, unit: str = "sentence") -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the sentences (or paragraphs) of ``text``, leading
    and trailing whitespace left out; every non-blank character is in one span."""
    if unit not in ("sentence", "paragraph"):
        raise ValueError(f"unit must be 'sentence' or 'paragraph', not {unit!r}")
    pattern = _SENTENCE_END if unit == "sentence" else _PARAGRAPH_END
    spans, start = [], 0
    for match in [*pattern.finditer(text), None]:
        # the closing quotes or brackets after the stop belong to the sentence
        closing = (match.group(1) or "") if match is not None and match.re.groups else ""
        end = len(text) if match is None else match.start() + len(closing)
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        if match is not None:
            start = match.end()
    return spans


def find_span(text: str, needle: str, occurrence: int = 0) -> tuple[int, int]:
    """Character span ``(start, end)`` of the ``occurrence``-th ``needle`` in ``text``,
    compared verbatim, else with whitespace compared loosely (a run of spaces, tabs and
    newlines matches any other run); else :class:`ValueError` says what to do."""
    for haystack, wanted, where in (_exact(text, needle), _loose(text, needle)):
        start, found = -1, 0
        while found <= occurrence:
            start = haystack.find(wanted, start + 1) if wanted else -1
            if start < 0:
                break
            found += 1
        if start >= 0:
            return where[start], where[start + len(wanted) - 1] + 1
    raise ValueError(
        f"{needle[:60]!r} occurs fewer than {occurrence + 1} times in the text, even with "
        "whitespace compared loosely: the tokenizer does not give it back verbatim (it "
        "normalizes it, or lacks some of its characters). Find a shorter piece of it, or "
        "give token positions: spans(..., by='token')"
    )


def _exact(text: str, needle: str) -> tuple[str, str, list[int]]:
    return text, needle, list(range(len(text)))


def _loose(text: str, needle: str) -> tuple[str, str, list[int]]:
    """``text`` and ``needle`` with every whitespace run made one space (``needle`` stripped),
    and where each character of the loose text is in ``text``."""
    loose: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        if ch.isspace():
            if loose and loose[-1] == " ":
                continue
            ch = " "
        loose.append(ch)
        where.append(i)
    return "".join(loose), " ".join(needle.split()), where


def last_span(text: str, needle: str) -> tuple[int, int] | None:
    """The character span of the last ``needle`` (or of it stripped) in ``text``, or None, with
    a warning, when ``text`` does not contain it verbatim (a tokenizer that normalizes text, or
    one without some of its characters): then the caller splits the whole prompt."""
    for candidate in (needle, needle.strip()):
        start = text.rfind(candidate) if candidate else -1
        if start >= 0:
            return start, start + len(candidate)
    warnings.warn(
        "the tokenizer does not give the message back verbatim: sentences are split over "
        "the whole prompt, chat template included",
        UserWarning,
        stacklevel=3,
    )
    return None


__all__ = [
    "char_offsets",
    "find_span",
    "last_span",
    "piece_texts",
    "starts_word",
    "text_spans",
    "tokens_in_span",
    "word_groups",
]
