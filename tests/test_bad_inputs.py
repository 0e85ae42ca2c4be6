"""Bad input gets a clear error before any work, and the model is left as it was: ids that are
not token ids of the model, an empty prompt, no new token to generate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import llama_attrib
from conftest import prompt, tiny_model, tiny_tokenizer
from llama_attrib import UnsupportedOptionError

IDS = prompt(9)
CASES: list[tuple[str, Any, str]] = [
    ("float", IDS.float(), "integer token ids, not torch.float32"),
    ("beyond the vocabulary", torch.tensor([[1, 5, 500, 7, 8]]), "holds 500, outside the model's 96"),
    ("negative", torch.tensor([[1, 5, -3, 7, 8]]), "holds -3, outside"),
    ("empty", torch.zeros((1, 0), dtype=torch.long), "input_ids is empty"),
]
CALLS: dict[str, Callable[[Any, Any], Any]] = {
    "decompose_sequence": lambda model, ids: llama_attrib.decompose_sequence(model, ids, 3),
    "decompose_sequence forward": lambda model, ids: llama_attrib.decompose_sequence(
        model, ids, mode="forward"
    ),
    "decompose_answer": lambda model, ids: llama_attrib.decompose_answer(model, ids, 3),
    "flow": lambda model, ids: llama_attrib.flow(model, ids),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize(("what", "ids", "message"), CASES, ids=[c[0] for c in CASES])
def test_ids_that_are_not_the_model_s_tokens_are_refused(
    call: str, what: str, ids: Any, message: str
) -> None:
    model = tiny_model()
    calls: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(UnsupportedOptionError, match=message):
            CALLS[call](model, ids)
    finally:
        handle.remove()
    assert calls == [] and not llama_attrib.is_wrapped(model)


@pytest.mark.parametrize("new", [0, -1])
def test_no_new_token_is_refused_before_generating(new: int) -> None:
    with pytest.raises(UnsupportedOptionError, match=f"max_new_tokens must be at least 1, not {new}"):
        llama_attrib.attribute(tiny_model(), tiny_tokenizer(), "the cat sat", new)


def test_an_empty_prompt_is_refused() -> None:
    """A prompt with no token (a tokenizer that adds no BOS, empty text)."""
    from tokenizers import processors

    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    with pytest.raises(UnsupportedOptionError, match="the prompt is empty"):
        llama_attrib.attribute(tiny_model(), tokenizer, "", 3)
    assert llama_attrib.attribute(tiny_model(), tokenizer, "the cat", 2).n_generated == 2


def _nan_model() -> Any:
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("how", ["exact", "attnlrp", "attnlrp-path", "forward", "flow"])
def test_a_model_that_computes_nan_is_named_as_the_cause(how: str) -> None:
    """NaN in the model's own weights: every rule set, forward mode and flow say the model's
    own numbers are not finite (flow blamed the model's layer structure), and leave it unwrapped."""
    model = _nan_model()
    ids = prompt(9)
    with pytest.raises(llama_attrib.DecompositionError, match="not finite"):
        if how == "flow":
            llama_attrib.flow(model, ids)
        elif how == "forward":
            llama_attrib.decompose_sequence(model, ids, 5, mode="forward")
        else:
            llama_attrib.decompose_sequence(model, ids, 5, rules=how)
    assert not llama_attrib.is_wrapped(model)


def test_an_exception_inside_the_credited_kernel_leaves_the_model_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AttnLRP's backward kernel raising mid-pass: the error reaches the caller and the model is
    unwrapped, with its forwards, attributes and logits as before; the next run works."""
    from llama_attrib.rules import lrp
    from test_wrap import snapshot

    model = tiny_model()
    ids = prompt(9)
    state, before = snapshot(model), model(ids).logits

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the kernel failed")

    monkeypatch.setattr(lrp, "_pull", broken)
    with pytest.raises(RuntimeError, match="the kernel failed"):
        llama_attrib.decompose_sequence(model, ids, 5, rules="attnlrp")
    monkeypatch.undo()
    assert not llama_attrib.is_wrapped(model) and snapshot(model) == state
    assert torch.equal(model(ids).logits, before)
    assert len(llama_attrib.decompose_sequence(model, ids, 5, rules="attnlrp")) == 4
