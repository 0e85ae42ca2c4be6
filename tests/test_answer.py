"""decompose_answer: the sum of every generated token's logit decomposed in one backward pass
equals the sum over steps of decompose_sequence's components (float32, 1e-5 of the summed
logits' scale), for groups, contrasts, biases (Qwen2), soft-caps (Gemma 2) and batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import llama_attrib
from conftest import prompt, tiny_model
from llama_attrib import UnsupportedOptionError, engines
from test_families import family_model

NEW = 5


Summed = tuple[torch.Tensor, torch.Tensor, float]


def _summed(model: nn.Module, ids: torch.Tensor, p: int, **kwargs: Any) -> Summed:
    """``([C, B] components, [B] bias shares, scale)``: decompose_sequence's steps, summed."""
    steps = llama_attrib.decompose_sequence(model, ids, p, **kwargs)
    batch, width = ids.shape[0], ids.shape[1] - 1
    groups = kwargs.get("groups")
    width = width if groups is None else steps[0].numc()
    components, bias, scale = torch.zeros(width, batch), torch.zeros(batch), 0.0
    targets = kwargs.get("targets")
    for k, c in enumerate(steps):
        for row in range(batch):
            tokens = (int(ids[row, p + k]),) if targets is None else targets  # a token, or (a, b)
            signs = (1.0, -1.0)[: len(tokens)]
            for token, sign in zip(tokens, signs, strict=True):
                x = c[row, token] if batch > 1 else c[token]
                components[: x.components.shape[0], row] += sign * x.components
                bias[row] += sign * x.residual
            scale += float(c.recovery.abs().max())
    return components, bias, scale


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "gpt2"])
def test_the_answer_matches_the_independent_reference(name: str) -> None:
    """Not against decompose_sequence (the same engine): each step's gradient x input on the
    stock model (conftest.gradient_x_input), summed over the answer's tokens."""
    from conftest import gradient_x_input

    model = tiny_model() if name == "llama" else family_model(name)
    ids = prompt(10)
    sequences = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    got = llama_attrib.decompose_answer(model, sequences, 10)
    want = torch.zeros(sequences.shape[1] - 1)
    bias, value, scale = 0.0, 0.0, 0.0
    for k in range(NEW):
        components, share, logit = gradient_x_input(model, sequences[:, : 10 + k], int(sequences[0, 10 + k]))
        want[: 10 + k] += components
        bias, value, scale = bias + share, value + logit, scale + abs(logit)
    assert torch.allclose(got.components, want, atol=1e-5 * scale, rtol=0)
    assert abs(float(got.residual) - bias) <= 1e-5 * scale
    assert abs(float(got.recovery) - value) <= 1e-5 * scale


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_the_answer_is_the_sum_of_its_steps(name: str) -> None:
    model = tiny_model() if name == "llama" else family_model(name)
    ids = prompt(10)
    sequences = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    want, bias, scale = _summed(model, sequences, 10)
    got = llama_attrib.decompose_answer(model, sequences, 10)
    assert got.components.shape == (sequences.shape[1] - 1,)
    assert torch.allclose(got.components, want[:, 0], atol=1e-5 * scale, rtol=0)
    assert torch.allclose(got.residual, bias[0], atol=1e-5 * scale, rtol=0)
    if name == "qwen2":
        assert float(got.residual.abs()) > 1e-3  # its q/k/v biases belong to no token
    with torch.no_grad():  # the stock modules; before Gemma 2's final soft-cap, as documented
        hidden = model.model(sequences).last_hidden_state
        logits = model.lm_head(hidden)[0, 9:-1]
    summed = logits.gather(-1, sequences[0, 10:, None]).sum()
    assert float(got.recovery) == pytest.approx(float(summed), abs=1e-5 * scale)


@pytest.mark.parametrize("ruleset", ["attnlrp", "attnlrp-path"])
def test_under_a_rule_set_each_share_of_the_answer_is_the_sum_of_its_steps(ruleset: str) -> None:
    """decompose_answer under a rule set that credits queries and keys: its components and
    each share of no token (the unassigned one above all) equal the sums over the steps of
    decompose_sequence's, one backward pass against one per step."""
    model = family_model("qwen2")  # biases too
    ids = prompt(10)
    sequences = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    got = llama_attrib.decompose_answer(model, sequences, 10, rules=ruleset)
    steps = llama_attrib.decompose_sequence(model, sequences, 10, rules=ruleset)
    length = sequences.shape[1] - 1
    want = torch.zeros(length)
    shares = dict.fromkeys(got.shares, 0.0)
    scale = 0.0
    for k, c in enumerate(steps):
        parts = c[int(sequences[0, 10 + k])]
        want[: parts.components.shape[0]] += parts.components
        for name in shares:
            shares[name] += float(parts.shares[name])
        scale += float(c.recovery.abs().max())
    assert torch.allclose(got.components, want, atol=1e-5 * scale, rtol=0)
    for name, value in shares.items():
        assert abs(float(got.shares[name]) - value) <= 1e-5 * scale, name
    assert abs(shares["unassigned"]) > 1e-3 and abs(shares["bias"]) > 1e-3


def test_groups_contrasts_and_a_padded_batch() -> None:
    model = tiny_model()
    ids = prompt(9, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    spans = {"first": (0, 4), "second": (4, 9)}
    for kwargs in ({"groups": spans}, {"targets": (3, 7)}, {}):
        want, bias, scale = _summed(model, ids, 6, attention_mask=mask, **kwargs)
        got = llama_attrib.decompose_answer(model, ids, 6, attention_mask=mask, **kwargs)
        assert got.components.shape == want.shape
        assert torch.allclose(got.components, want, atol=1e-5 * scale, rtol=0), kwargs
        assert torch.allclose(got.residual, bias, atol=1e-5 * scale, rtol=0), kwargs


def test_one_target_whatever_the_answer_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole answer is pulled back as one target: one request, one batched backward."""
    model = tiny_model()
    ids = prompt(8)
    sequences = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    seen: list[int] = []
    solve = engines.TargetRun.solve

    def counting(self: engines.TargetRun, requests: Any) -> torch.Tensor:
        seen.append(len(requests))
        return solve(self, requests)

    monkeypatch.setattr(engines.TargetRun, "solve", counting)
    llama_attrib.decompose_answer(model, sequences, 8)
    assert seen == [1]


def test_bad_input_is_refused() -> None:
    model = tiny_model()
    ids = prompt(8)
    for p in (0, 8, None):
        with pytest.raises(UnsupportedOptionError, match="prompt_length"):
            llama_attrib.decompose_answer(model, ids, p)  # type: ignore[arg-type]
    assert not llama_attrib.is_wrapped(model)
