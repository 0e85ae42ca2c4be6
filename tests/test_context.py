"""Context attribution: the prompt's sentences (or paragraphs) as sources of an answer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import llama_attrib
from conftest import tiny_model, tiny_tokenizer
from llama_attrib.tokens import text_spans


@pytest.mark.parametrize(
    ("text", "unit", "expected"),
    [
        ("Anna lives in Lisbon. Tom lives in Oslo! Does he?", "sentence",
         ["Anna lives in Lisbon.", "Tom lives in Oslo!", "Does he?"]),
        ('He said "Stop." Then 3 cats left.\nA list item\n\nNext paragraph.', "sentence",
         ['He said "Stop."', "Then 3 cats left.", "A list item", "Next paragraph."]),
        ("It costs 3.5 euros. ok fine. Done", "sentence", ["It costs 3.5 euros. ok fine.", "Done"]),
        ("One. Two.\n\n  Three.\n\n", "paragraph", ["One. Two.", "Three."]),
    ],
)  # fmt: skip
def test_text_spans(text: str, unit: str, expected: list[str]) -> None:
    assert [text[a:b] for a, b in text_spans(text, unit)] == expected


def test_sentences_keep_every_score_and_rank_the_answer() -> None:
    text = "the cat sat on the mat.\nthe dog sat on the rug."  # the tiny vocabulary has no capitals
    result = llama_attrib.attribute(tiny_model(2), tiny_tokenizer(), text, max_new_tokens=3)
    view = result.sentences()
    assert view.sources == ["the cat sat on the mat.", "the dog sat on the rug.", "(rest)"]
    assert result.tokens[view.columns[2][0]] == "<s>"  # the BOS token is no sentence's
    # grouping moves scores between columns, never loses one: each row still sums to the logit
    assert np.allclose(np.nansum(view.scores, 1), result.logits, atol=1e-4)
    ranking = view.ranking()
    assert [r[1] for r in ranking] == sorted((r[1] for r in ranking), reverse=True)
    assert np.isclose(sum(abs(r[2]) for r in ranking), 1.0)
    totals = np.nansum(view.scores, 0)
    assert ranking[0][1] == pytest.approx(float(totals.max()), rel=1e-6)
    assert view.ranking(steps=[0], k=1)[0][1] == pytest.approx(float(np.nanmax(view.scores[0])), rel=1e-6)
    # a span of the answer: the steps whose tokens it overlaps
    p = result.prompt_length
    start = len("".join(result.tokens[: p + 1]))
    end = start + len(result.tokens[p + 1]) + len(result.tokens[p + 2])
    assert result.steps_in(start, end) == [1, 2]
    assert result.steps_in(start, start + 1) == [1]
    with pytest.raises(ValueError, match="no generated token"):
        result.steps_in(0, 3)


@pytest.mark.slow
def test_a_planted_fact_is_found(smollm2: tuple[Any, Any]) -> None:
    """SmolLM2 reads a short document with one fact among filler; the sentence holding the fact
    ranks first among the document's sentences for the answer as a whole."""
    model, tokenizer = smollm2
    filler = [
        "The town hall was repainted last spring.",
        "Many visitors come for the old bridge.",
        "The library opens at nine on weekdays.",
        "Bus line four runs every twenty minutes.",
    ]
    fact = "The secret code of the archive is 7319."
    document = " ".join([*filler[:2], fact, *filler[2:]])
    question = f"{document}\n\nWhat is the secret code of the archive? Answer with the number."
    result = llama_attrib.attribute(model, tokenizer, question, max_new_tokens=14, chat=True)
    assert "7319" in result.generation
    view = result.sentences(within=result.find(document))
    ranking = [label for label, _, _ in view.ranking() if label != "(rest)"]
    assert ranking[0] == fact
