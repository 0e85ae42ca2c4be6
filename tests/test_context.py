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
    # independently of the views: each sentence's token positions found in the text, its score
    # summed from the token-level scores in Python, and the sentences sorted by that score
    ends = np.cumsum([len(t) for t in result.tokens])
    starts = ends - np.array([len(t) for t in result.tokens])
    sentences = ["the cat sat on the mat.", "the dog sat on the rug."]
    spans = {label: (text.index(label), text.index(label) + len(label)) for label in sentences}
    offset = len(result.tokens[0])  # the BOS token's text comes first

    def inside(i: int, a: int, b: int) -> bool:
        return i < result.prompt_length and starts[i] >= a + offset and ends[i] <= b + offset

    expected = {
        label: sum(
            float(result.token_scores[k, i])
            for k in range(result.n_generated)
            for i in range(result.prompt_length)
            if inside(i, a, b)
        )
        for label, (a, b) in spans.items()
    }
    ranking = {label: score for label, score, _ in view.ranking()}
    for label, score in expected.items():
        assert ranking[label] == pytest.approx(score, rel=1e-5, abs=1e-5)
    ordered = [label for label, _, _ in view.ranking() if label in expected]
    assert ordered == sorted(expected, key=lambda label: -expected[label])
    shares = [share for _, _, share in view.ranking()]
    outside = view.outside()  # "(rest)": kept out of the ranking, reported apart with its share
    assert outside is not None and outside[0] == "(rest)" and "(rest)" not in [r[0] for r in view.ranking()]
    assert sum(abs(x) for x in shares) + abs(outside[2]) == pytest.approx(1.0)
    assert view.ranking(apart=None) == sorted([*view.ranking(), outside], key=lambda r: -r[1])
    # one step: each sentence's score at step 0 alone
    step0 = {label: score for label, score, _ in view.ranking(steps=[0])}
    for label, (a, b) in spans.items():
        alone = sum(float(result.token_scores[0, i]) for i in range(result.prompt_length) if inside(i, a, b))
        assert step0[label] == pytest.approx(alone, rel=1e-5, abs=1e-5)
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
