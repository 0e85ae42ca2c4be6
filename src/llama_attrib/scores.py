"""``Scores``: the numbers of an :class:`~llama_attrib.result.Attribution` and their views.

The score matrix is ``[generated step, source]``. At token level, source ``j`` is position
``j`` of the sequence (prompt then generated tokens), there are ``P + G - 1`` sources for
``P`` prompt and ``G`` generated tokens, and step ``k`` (which produced token ``P + k``) has
``P + k`` sources: the entries above that causal diagonal are NaN, never 0, so that "no
contribution" and "cannot contribute" stay apart. Each row sums to the logit of the token
generated at that step (``logits``), exactly up to float32 rounding.

Views (normalisation, words, spans) return a new ``Attribution`` that keeps the same
token-level numbers and only changes how they are grouped and scaled, so they compose and
save losslessly.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np

from . import tokens as _tokens
from ._sequence import TokenText
from .composition import SHARES

Unit = Literal["logit", "share"]


class Contributor(NamedTuple):
    """One source of one step: its column, its label, its score in the result's unit."""

    column: int
    label: str
    score: float


S = TypeVar("S", bound="Scores")


@dataclass(eq=False)
class Scores(TokenText):
    """Exact per-source contributions to every generated token's logit: the numbers of an
    :class:`~llama_attrib.result.Attribution` and the views that regroup and rescale them.

    tokens: text piece of every position (prompt + generated), ``"".join(tokens)`` is the
    text. token_ids, pieces (the tokenizer's raw pieces), special: per position.
    prompt_length: ``P``. token_scores: ``[G, P + G - 1]`` float32, logit units, NaN above
    the causal diagonal. logits: ``[G]`` what each row explains: the real logit of each
    generated token (or, from ``attribute(contrast=..., target=...)``, the difference of two
    logits or the log-probability target).
    options / versions: what produced it. groups / labels: the source columns as lists of
    token positions (``None``: one column per token). unit: ``"logit"`` (raw logit units) or
    ``"share"`` (each score over the sum of the row's absolute scores and the absolute share of
    no token, :attr:`no_token`, so that these absolute values add up to 1). drop_first: leave out
    position 0, an attention sink that absorbs large contributions (its column becomes NaN
    and shares are taken over the rest). The shares of no token, each ``[G]`` in logit units
    (:data:`SHARES`): ``bias``, what the biases of linear maps and LayerNorms contribute;
    ``rounding``, what quantized kernels round beyond their dequantized linear maps
    (LLM.int8's activations; zero for an unquantized model); ``unassigned``, what the rule
    set passed to no input (zero under the exact rules; :mod:`llama_attrib.rules.sets`).
    Their sum is :attr:`no_token`: a row's scores plus ``no_token`` add up to ``logits``.
    """

    tokens: list[str]
    token_ids: list[int]
    prompt_length: int
    token_scores: np.ndarray
    logits: np.ndarray
    pieces: list[str] = field(default_factory=list)
    special: list[bool] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    groups: list[list[int]] | None = None
    labels: list[str] | None = None
    unit: Unit = "logit"
    drop_first: bool = False
    bias: np.ndarray | None = None
    rounding: np.ndarray | None = None
    unassigned: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.token_scores = np.asarray(self.token_scores, dtype=np.float32)
        self.logits = np.asarray(self.logits, dtype=np.float32)
        g = self.token_scores.shape[0]
        for name in SHARES:
            value = getattr(self, name)
            value = np.zeros(g, np.float32) if value is None else np.ascontiguousarray(value, np.float32)
            if value.shape != (g,):
                raise ValueError(f"{name} has shape {value.shape}, expected ({g},): one share per step")
            setattr(self, name, value)
        self.pieces = self.pieces or list(self.tokens)
        self.special = self.special or [False] * len(self.tokens)
        g, n = self.n_generated, len(self.tokens)
        if self.token_scores.shape != (g, max(n - 1, 0)) or self.prompt_length + g != n:
            raise ValueError(
                f"token_scores {self.token_scores.shape} does not fit {n} tokens with prompt "
                f"length {self.prompt_length} (expected [{n - self.prompt_length}, {n - 1}])"
            )
        if self.unit not in ("logit", "share"):
            raise ValueError(f"unit must be 'logit' or 'share', not {self.unit!r}")
        if (self.groups is None) != (self.labels is None):
            raise ValueError("groups and labels go together")

    # -- the view ----------------------------------------------------------------------
    @property
    def columns(self) -> list[list[int]]:
        """Token positions behind every source column."""
        if self.groups is not None:
            return self.groups
        return [[j] for j in range(self.token_scores.shape[1])]

    @property
    def sources(self) -> list[str]:
        """Label of every source column: the token's text, the word, or the span's name."""
        return self.labels if self.labels is not None else self.source_tokens

    @property
    def scores(self) -> np.ndarray:
        """The ``[G, sources]`` float64 score matrix in this view's grouping and unit.

        A column is NaN at a step that none of its tokens can contribute to (above the
        causal diagonal, or the first token with ``drop_first``).
        """
        tok = self._token_view()
        out = np.full((tok.shape[0], len(self.columns)), np.nan)
        for j, positions in enumerate(self.columns):
            part = tok[:, positions]
            seen = ~np.isnan(part)
            out[:, j] = np.where(seen.any(1), np.where(seen, part, 0.0).sum(1), np.nan)
        return out

    def _token_view(self) -> np.ndarray:
        tok = self.token_scores.astype(np.float64)
        if self.drop_first and tok.shape[1]:
            tok[:, 0] = np.nan
        if self.unit == "share":
            tok = tok / self._share_total()
        return tok

    def _share_total(self) -> np.ndarray:
        """``[G, 1]``: the sum of the absolute scores and of the absolute share of no token of
        each step."""
        tok = self.token_scores.astype(np.float64)
        if self.drop_first and tok.shape[1]:
            tok[:, 0] = np.nan
        total = np.nansum(np.abs(tok), axis=1, keepdims=True) + np.abs(self.no_token)[:, None]
        return np.where(total > 0, total, 1.0)

    @property
    def shares(self) -> dict[str, np.ndarray]:
        """The shares of no token by name (:data:`SHARES`), each ``[G]`` in logit units."""
        return {name: np.asarray(getattr(self, name)) for name in SHARES}

    @property
    def no_token(self) -> np.ndarray:
        """``[G]`` float64: what no token owns at each step, the sum of the shares ``bias +
        rounding + unassigned``. ``sum(token_scores) + no_token`` is the logit."""
        return np.asarray(np.sum([share.astype(np.float64) for share in self.shares.values()], axis=0))

    @property
    def share_scores(self) -> dict[str, np.ndarray]:
        """The shares of no token by name, each ``[G]`` in this view's unit."""
        return {name: self._in_unit(share) for name, share in self.shares.items()}

    @property
    def no_token_scores(self) -> np.ndarray:
        """``[G]``: :attr:`no_token` in this view's unit; ``sum(scores) + no_token_scores`` is
        the logit (in ``"logit"`` units; in ``"share"`` units, the absolute values add up to 1
        with the absolute scores)."""
        return self._in_unit(self.no_token)

    @property
    def bias_scores(self) -> np.ndarray:
        """Deprecated: :attr:`no_token_scores` (the sum of the three shares), which this name
        gave before the shares were named; the biases' own share is ``share_scores["bias"]``."""
        message = "Attribution.bias_scores is the whole share of no token: use no_token_scores for it"
        warnings.warn(message + ", or share_scores['bias'] for the biases alone", DeprecationWarning, 2)
        return self.no_token_scores

    def _in_unit(self, share: np.ndarray) -> np.ndarray:
        share = share.astype(np.float64)
        return share / self._share_total()[:, 0] if self.unit == "share" else share

    def normalize(self: S, unit: Unit = "share", drop_first: bool = False) -> S:
        """The same result in ``unit`` (``"logit"`` or ``"share"``), with or without token 0."""
        return dataclasses.replace(self, unit=unit, drop_first=drop_first)

    def words(self: S) -> S:
        """Sources summed over words (subword pieces joined; byte-level BPE and SentencePiece).

        Words never straddle the prompt/generation boundary. Replaces any earlier grouping.
        """
        n = self.token_scores.shape[1]
        groups = _tokens.word_groups(
            self.tokens[:n], self.pieces[:n], self.special[:n], breaks=(self.prompt_length,)
        )
        return self.grouped(groups)

    def grouped(self: S, groups: Sequence[Sequence[int]], labels: Sequence[str] | None = None) -> S:
        """Sources summed over ``groups`` of token positions (labels default to their text)."""
        n = self.token_scores.shape[1]
        columns = [sorted(int(i) for i in g) for g in groups]
        bad = [g for g in columns if not g or g[0] < 0 or g[-1] >= n]
        if bad:
            raise ValueError(f"groups must be non-empty lists of source positions 0..{n - 1}: {bad}")
        if labels is None:
            labels = ["".join(self.tokens[i] for i in g) for g in columns]
        if len(labels) != len(columns):
            raise ValueError(f"{len(labels)} labels for {len(columns)} groups")
        return dataclasses.replace(self, groups=columns, labels=list(labels))

    def tokens_level(self: S) -> S:
        """Back to one source column per token."""
        return dataclasses.replace(self, groups=None, labels=None)

    def find(self, text: str, occurrence: int = 0) -> tuple[int, int]:
        """Character span ``(start, end)`` of the ``occurrence``-th ``text`` in :attr:`text`.

        Where the tokenizer does not give the text back verbatim, whitespace is compared
        loosely (a run of spaces, tabs and newlines matches any other run): the span is then
        that of the decoded text. Otherwise :class:`ValueError` says what to do."""
        return _tokens.find_span(self.text, text, occurrence)

    def message(self, text: str) -> tuple[int, int] | None:
        """The character span of a prompt message ``text`` (for :meth:`sentences`'s ``within``),
        or None, with a warning, when the decoded text does not contain it verbatim (a tokenizer
        that normalizes text, or one without some of its characters): then the caller splits
        the whole prompt. Its last occurrence in the prompt: a chat's last user message."""
        prompt = self.text[: len("".join(self.tokens[: self.prompt_length]))]
        return _tokens.last_span(prompt, text)

    def spans(
        self: S,
        spans: Mapping[str, tuple[int, int]] | Sequence[tuple[int, int]],
        by: Literal["char", "token"] = "char",
        rest: str | None = "(rest)",
    ) -> S:
        """Sources summed over spans: ``{"name": (start, end)}`` or a list of ``(start, end)``.

        ``by="char"``: character offsets in :attr:`text` (see :meth:`find`); a token belongs
        to a span if it overlaps it. ``by="token"``: token positions ``[start, end)``.
        ``rest``: the label of one more column with every source token in no span (None:
        no such column). Spans may overlap; then a token counts in each.
        """
        if isinstance(spans, Mapping):
            named = [(str(name), span) for name, span in spans.items()]
        else:
            text = self.text if by == "char" else ""
            named = [(text[a:b] if by == "char" else "".join(self.tokens[a:b]), (a, b)) for a, b in spans]
        n = self.token_scores.shape[1]
        groups, labels = [], []
        for label, (a, b) in named:
            inside = _tokens.tokens_in_span(self.tokens, a, b) if by == "char" else range(a, b)
            positions = [i for i in inside if i < n]
            if not positions:
                raise ValueError(f"span {label!r} ({a}, {b}) covers no source token")
            groups.append(positions)
            labels.append(label)
        covered = {i for g in groups for i in g}
        others = [i for i in range(n) if i not in covered]
        if rest is not None and others:
            groups.append(others)
            labels.append(rest)
        return self.grouped(groups, labels)

    def sentences(
        self: S, unit: Literal["sentence", "paragraph"] = "sentence", within: tuple[int, int] | None = None
    ) -> S:
        """Sources summed over the sentences (or paragraphs) of the prompt, split without any
        download (:func:`llama_attrib.tokens.text_spans`). ``within``: a character span of the
        text to split (one chat message, say; see :meth:`find`), default the prompt's text after
        its leading special tokens.
        Tokens outside every sentence (template tokens, the generated ones) form ``"(rest)"``."""
        p = self.prompt_length
        lead = next((i for i in range(p) if not self.special[i]), p)  # BOS and the like
        start, end = (
            within
            if within is not None
            else (len("".join(self.tokens[:lead])), len("".join(self.tokens[:p])))
        )
        spans = {}
        for a, b in _tokens.text_spans(self.text[start:end], unit):
            label = self.text[start + a : start + b]
            label = label if label not in spans else f"{label} ({start + a})"
            spans[label] = (start + a, start + b)
        if not spans:
            raise ValueError("no sentence in that text")
        return self.spans(spans)

    def steps_in(self, start: int, end: int) -> list[int]:
        """The generated steps whose tokens overlap the character span ``[start, end)`` of
        :attr:`text` (one sentence of the answer, say; see :meth:`find`), for :meth:`ranking`."""
        p = self.prompt_length
        steps = [
            i - p for i in _tokens.tokens_in_span(self.tokens, start, end) if p <= i < p + self.n_generated
        ]
        if not steps:
            raise ValueError(f"the span ({start}, {end}) covers no generated token")
        return steps

    def by(self: S, unit: str, within: tuple[int, int] | None = None) -> S:
        """Sources by ``unit``: ``"token"``, ``"word"``, ``"sentence"`` or ``"paragraph"``
        (the last two within ``within``, a character span; see :meth:`sentences`)."""
        if unit == "token":
            return self.tokens_level()
        if unit == "word":
            return self.words()
        if unit in ("sentence", "paragraph"):
            return self.sentences(unit, within)  # type: ignore[arg-type]
        raise ValueError(f"unit must be 'token', 'word', 'sentence' or 'paragraph', not {unit!r}")

    def ranking(
        self,
        steps: Sequence[int] | None = None,
        k: int | None = None,
        apart: str | None = "(rest)",
        verify: int = 0,
        model: Any = None,
    ) -> Any:
        """The sources of the answer as a whole: each source's score summed over ``steps``
        (default every generated token), largest first, as ``(label, score, share)`` where the
        share is of the sum of absolute scores. With :meth:`sentences`: which sentences the
        answer came from. ``apart``: a column kept out of the ranking, what lies outside the
        sentences (template, question, the attention sink), given by :meth:`outside`.
        ``verify=m`` (with ``model``): the ``m`` first re-ranked by the measured drop of the
        answer's log-probability without each (:class:`~llama_attrib.verify.Citations`)."""
        out = [row for row in self._totals(steps) if row[0] != apart]
        if verify:
            from .verify import verified

            return verified(self, model, out, k, verify)
        return out if k is None else out[:k]

    def outside(
        self, steps: Sequence[int] | None = None, label: str = "(rest)"
    ) -> tuple[str, float, float] | None:
        """``(label, score, share)`` of the column :meth:`ranking` keeps apart (None if none)."""
        return next((row for row in self._totals(steps) if row[0] == label), None)

    def _totals(self, steps: Sequence[int] | None) -> list[tuple[str, float, float]]:
        rows = list(range(self.n_generated)) if steps is None else list(steps)
        if not rows:
            raise ValueError("ranking needs at least one generated step")
        totals = np.nansum(self.scores[rows], axis=0)
        seen = ~np.all(np.isnan(self.scores[rows]), axis=0)
        order = [int(j) for j in np.argsort(-totals, kind="stable") if seen[j]]
        norm = float(np.abs(totals[seen]).sum()) or 1.0
        return [(self.sources[j], float(totals[j]), float(totals[j]) / norm) for j in order]

    # -- reading -----------------------------------------------------------------------
    def top_k(self, k: int = 5, step: int | None = None) -> list[list[Contributor]]:
        """The ``k`` largest sources by absolute score, per step (or for ``step`` only)."""
        scores, steps = self.scores, range(self.n_generated) if step is None else [step]
        result = []
        for s in steps:
            row = scores[s]
            valid = np.flatnonzero(~np.isnan(row))
            order = valid[np.argsort(-np.abs(row[valid]), kind="stable")][:k]
            result.append([Contributor(int(j), self.sources[j], float(row[j])) for j in order])
        return result

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scores):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if not (a.shape == b.shape and np.array_equal(a, b, equal_nan=True)):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


__all__ = ["Contributor", "Scores"]
