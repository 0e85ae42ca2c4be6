"""attribute()'s given response, contrast and log-probability target, each against the
independent reference (conftest.gradient_x_input on the stock model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import llama_attrib
from conftest import gradient_x_input, tiny_model, tiny_tokenizer


def _reference(
    model: Any, sequence: torch.Tensor, p: int, k: int, objective: Any = None
) -> tuple[Any, float]:
    """Components and bias share of step ``k`` (which predicted ``sequence[p + k]``)."""
    token = int(sequence[p + k])
    components, bias, _ = gradient_x_input(model, sequence[None, : p + k], token, objective=objective)
    return components.numpy(), bias


@pytest.mark.parametrize("mode", [True, "forward"])
def test_a_given_response_is_explained_token_by_token(mode: Any) -> None:
    model, tokenizer = tiny_model(2), tiny_tokenizer()
    result = llama_attrib.attribute(
        model, tokenizer, "the cat sat", response=" on the rug, and the dog", mode=mode
    )
    sequence = torch.tensor(result.token_ids)
    p = result.prompt_length
    answer = tokenizer(" on the rug, and the dog", add_special_tokens=False)["input_ids"]
    assert result.token_ids[p:] == answer  # the response, not what the model would generate
    assert result.n_generated == len(answer)
    with torch.no_grad():
        logits = model(sequence[None]).logits[0]
    for k in range(result.n_generated):
        components, bias = _reference(model, sequence, p, k)
        scale = float(logits[p - 1 + k].abs().max())
        assert np.allclose(result.token_scores[k, : p + k], components, atol=1e-5 * scale, rtol=0)
        assert abs(result.bias[k] - bias) <= 1e-5 * scale
        assert abs(result.logits[k] - float(logits[p - 1 + k, answer[k]])) <= 1e-5 * scale
    assert result.options["response"] == " on the rug, and the dog"
    assert not llama_attrib.is_wrapped(model)


@pytest.mark.parametrize("mode", [True, "forward"])
def test_a_contrast_explains_the_difference_of_two_logits(mode: Any) -> None:
    model, tokenizer = tiny_model(2), tiny_tokenizer()
    other = 7
    result = llama_attrib.attribute(
        model, tokenizer, "the cat sat", max_new_tokens=3, contrast=other, mode=mode
    )
    sequence = torch.tensor(result.token_ids)
    p = result.prompt_length
    for k in range(result.n_generated):
        a, bias_a = _reference(model, sequence, p, k)
        b, bias_b, _ = gradient_x_input(model, sequence[None, : p + k], other)
        assert np.allclose(result.token_scores[k, : p + k], a - b.numpy(), atol=1e-4, rtol=0)
        assert abs(result.bias[k] - (bias_a - bias_b)) <= 1e-4
        assert abs(np.nansum(result.token_scores[k]) + result.bias[k] - result.logits[k]) <= 1e-4
    plain = llama_attrib.attribute(model, tokenizer, "the cat sat", max_new_tokens=3)
    assert plain.token_ids == result.token_ids  # the same answer, another question
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="one token"):
        llama_attrib.attribute(model, tokenizer, "the cat sat", contrast="the cat sat on")


@pytest.mark.parametrize("mode", [True, "forward"])
def test_the_log_probability_target_is_exact_and_linear(mode: Any) -> None:
    """The row explains z_t - sum_j p_j z_j with p frozen: against gradient x input of that very
    objective (p detached), and its value is log p_t plus the step's entropy."""
    model, tokenizer = tiny_model(2), tiny_tokenizer()
    result = llama_attrib.attribute(
        model, tokenizer, "the cat sat", response=" on the mat", target="logprob", mode=mode
    )
    sequence = torch.tensor(result.token_ids)
    p = result.prompt_length
    with torch.no_grad():
        logits = model(sequence[None]).logits[0].float()
    for k in range(result.n_generated):
        token = int(sequence[p + k])

        def objective(z: torch.Tensor, token: int = token) -> torch.Tensor:
            return z[token] - (torch.softmax(z, -1).detach() * z).sum()

        components, bias = _reference(model, sequence, p, k, objective)
        assert np.allclose(result.token_scores[k, : p + k], components, atol=1e-4, rtol=0)
        assert abs(result.bias[k] - bias) <= 1e-4
        z = logits[p - 1 + k]
        log_p = torch.log_softmax(z, -1)
        entropy = -(log_p.exp() * log_p).sum()
        assert abs(result.logits[k] - float(log_p[token] + entropy)) <= 1e-4
        assert abs(np.nansum(result.token_scores[k]) + result.bias[k] - result.logits[k]) <= 1e-4
