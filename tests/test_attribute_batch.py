"""attribute() over several prompts at once: each result equal to its prompt's own."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import llama_attrib
from conftest import tiny_model, tiny_tokenizer

PROMPTS = ["the cat sat", "a dog ran off to the park", "where", "the cat sat on the mat and the dog ran"]


def same(a: llama_attrib.Attribution, b: llama_attrib.Attribution) -> None:
    assert a.token_ids == b.token_ids and a.prompt_length == b.prompt_length
    scale = float(np.abs(b.logits).max())
    np.testing.assert_allclose(a.token_scores, b.token_scores, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(a.bias, b.bias, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("mode", [True, "forward"])
def test_several_prompts_equal_one_at_a_time(mode: Any) -> None:
    model, tokenizer = tiny_model(2), tiny_tokenizer()
    alone = [llama_attrib.attribute(model, tokenizer, p, 5, mode=mode) for p in PROMPTS]
    together = llama_attrib.attribute(model, tokenizer, PROMPTS, 5, mode=mode, batch_size=3)
    assert isinstance(together, list) and len(together) == len(PROMPTS)
    for a, b in zip(together, alone, strict=True):
        same(a, b)
        assert a.options["prompt"] == b.options["prompt"]
    assert not llama_attrib.is_wrapped(model)


def test_a_row_stops_at_its_end_of_sequence_token_as_it_would_alone() -> None:
    model, tokenizer = tiny_model(2), tiny_tokenizer()
    first = llama_attrib.attribute(model, tokenizer, PROMPTS[1], 5)
    stop = first.token_ids[first.prompt_length + 1]  # the second token it generates
    alone = [llama_attrib.attribute(model, tokenizer, p, 5, eos_token_id=stop) for p in PROMPTS]
    assert alone[1].n_generated == 2  # stopped there
    together = llama_attrib.attribute(model, tokenizer, PROMPTS, 5, eos_token_id=stop, batch_size=4)
    assert [r.n_generated for r in together] == [r.n_generated for r in alone]
    for a, b in zip(together, alone, strict=True):
        same(a, b)


def test_chats_and_the_one_at_a_time_options() -> None:
    model, tokenizer = tiny_model(2), tiny_tokenizer()
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    one = llama_attrib.attribute(model, tokenizer, chats[0], 3)  # one chat: one result
    assert isinstance(one, llama_attrib.Attribution)
    several = llama_attrib.attribute(model, tokenizer, chats, 3)
    same(several[0], one)
    logprob = llama_attrib.attribute(model, tokenizer, PROMPTS[:2], 3, target="logprob")
    same(logprob[1], llama_attrib.attribute(model, tokenizer, PROMPTS[1], 3, target="logprob"))
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="batch_size"):
        llama_attrib.attribute(model, tokenizer, PROMPTS, 3, batch_size=0)


def test_the_decomposition_options_reach_the_pass_not_generate() -> None:
    """With a response, a contrast or the log-probability target, attribute() generates plainly
    and then decomposes the sequence: max_memory, precision and component_dtype go to the
    decomposition (a tiny budget is refused there), not to generate (which rejects them)."""
    model, tokenizer = tiny_model(2), tiny_tokenizer()
    with pytest.raises(llama_attrib.MemoryBudgetError):
        llama_attrib.attribute(model, tokenizer, "the cat sat", response=" on the mat", max_memory="1KB")
    result = llama_attrib.attribute(
        model, tokenizer, "the cat sat", 3, target="logprob", max_memory="1GiB", precision="float32"
    )
    assert result.n_generated == 3 and result.options["generate"]["precision"] == "float32"
