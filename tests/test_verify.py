"""``ranking(verify=m)``: each cited source's measured drop of the answer's log-probability
equals a plain forward of the stock model without that source's tokens."""

from __future__ import annotations

import pytest
import torch

import llama_attrib
from conftest import tiny_model, tiny_tokenizer
from llama_attrib.verify import Citation, answer_logprob

DOCUMENT = "the cat sat on the mat.\n\nthe dog sat on the rug.\n\nparis is the capital of france."


def _logprob(model: torch.nn.Module, ids: list[int], answer: int) -> float:
    """The answer's log-probability (its last ``answer`` tokens) in one plain forward, no padding."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    steps = torch.log_softmax(logits[len(ids) - answer - 1 : len(ids) - 1], -1)
    return float(steps.gather(-1, torch.tensor(ids[-answer:])[:, None]).sum())


def test_each_citation_s_drop_is_a_forward_without_it() -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    result = llama_attrib.attribute(model, tokenizer, f"{DOCUMENT}\nwhere is the cat", max_new_tokens=4)
    view = result.sentences("paragraph", within=result.find(DOCUMENT))
    cited = view.ranking(k=2, verify=3, model=model)
    assert len(cited) == 2 and all(isinstance(c, Citation) for c in cited)
    assert [c.drop for c in cited] == sorted((c.drop for c in cited), reverse=True)
    ids, g = result.token_ids, result.n_generated
    full = _logprob(model, ids, g)
    for c in cited:
        gone = set(view.columns[view.sources.index(c.label)])
        alone = _logprob(model, [t for i, t in enumerate(ids) if i not in gone], g)
        assert c.drop == pytest.approx(full - alone, abs=1e-4)
        assert c.supported == (c.drop > 0)
        assert (c.score, c.share) in [(s, h) for label, s, h in view.ranking() if label == c.label]
    both = {i for c in cited for i in view.columns[view.sources.index(c.label)]}
    assert cited.together == pytest.approx(
        full - _logprob(model, [t for i, t in enumerate(ids) if i not in both], g), abs=1e-4
    )


def test_batched_and_padded_equals_one_at_a_time() -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    ids = tokenizer("the cat sat on the mat and the dog", return_tensors="pt").input_ids[0].tolist()
    removals = [[], [1, 2], [3], [1, 4, 5]]
    batched = answer_logprob(model, ids, 7, removals, batch=3, reuse=False)
    for removed, got in zip(removals, batched, strict=True):
        kept = [t for i, t in enumerate(ids) if i not in set(removed)]
        assert got == pytest.approx(_logprob(model, kept, len(ids) - 7), abs=1e-4)


@pytest.mark.parametrize("name", ["llama", "mistral", "granitemoehybrid"])
def test_reusing_the_prefix_s_cache_equals_a_forward_without_each_removal(name: str) -> None:
    """AttriBoT's saving (the unchanged prefix from one forward's cache, cropped before each
    removal) against a plain forward of the shortened sequence: removals at the start, in the
    middle and right before the answer. Where the cache cannot be cropped (a sliding window
    that slid, a hybrid's recurrent state, a removal at position 0) it falls back to full
    forwards, with the same numbers."""
    from test_families import family_model

    model = tiny_model() if name == "llama" else family_model(name)
    ids = [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]
    removals = [[], [1, 2], [4], [5, 6, 7], [8], [2, 7]]
    for chosen in (removals, [*removals, [0]]):  # with a removal at 0: the fallback
        got = answer_logprob(model, ids, 9, chosen)
        for removed, value in zip(chosen, got, strict=True):
            kept = [t for i, t in enumerate(ids) if i not in set(removed)]
            assert value == pytest.approx(_logprob(model, kept, 3), abs=1e-4), (name, removed)


def test_verify_needs_the_model_and_removes_prompt_tokens_only() -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    result = llama_attrib.attribute(model, tokenizer, DOCUMENT, max_new_tokens=2)
    view = result.sentences("paragraph")
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="pass model=model"):
        view.ranking(verify=2)
    with pytest.raises(ValueError, match="prompt tokens only"):
        answer_logprob(model, result.token_ids, result.prompt_length, [[result.prompt_length]])
