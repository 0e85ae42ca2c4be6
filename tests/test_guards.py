"""Each run-time guard fires when its behaviour is broken, with a message that says what to do."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import llama_attrib
from conftest import prompt, tiny_model, tiny_tokenizer
from llama_attrib import rules
from llama_attrib.errors import GeneratedTokenWarning


def _drifting_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break one rule: the norms' frozen factor 1% off, as a wrong rule for a new family would be."""
    real = rules.RMSNorm.factor

    def drifted(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real(*args, **kwargs) * 1.01

    monkeypatch.setattr(rules.RMSNorm, "factor", drifted)


def test_forward_mode_guard_fires_when_components_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama_attrib.wrap(tiny_model(2))
    _drifting_norm(monkeypatch)
    with pytest.raises(llama_attrib.DecompositionError, match="do not add up"):
        model(prompt(9), decompose="forward")
    with pytest.raises(llama_attrib.DecompositionError, match="do not add up"):
        llama_attrib.decompose_sequence(model, prompt(9), 5, mode="forward")


def test_target_mode_guard_compares_with_the_stock_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Target mode's pass is the rules' own; the guard checks it against a plain stock forward,
    so a rule that drifts cannot produce numbers that add up to the wrong logit."""
    model = llama_attrib.wrap(tiny_model(2))
    _drifting_norm(monkeypatch)
    with pytest.raises(llama_attrib.DecompositionError, match="the model's logit"):
        model.generate(prompt(9), decompose=True, return_dict_in_generate=True, max_new_tokens=2)


@pytest.mark.parametrize("mode", ["target", "forward"])
def test_a_nan_logit_gets_its_own_error(mode: str) -> None:
    model = tiny_model(2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    llama_attrib.wrap(model)
    with pytest.raises(llama_attrib.DecompositionError, match="not finite"):
        model.generate(prompt(9), decompose=mode, return_dict_in_generate=True, max_new_tokens=2)


@pytest.mark.parametrize("mode", ["target", "forward"])
def test_each_step_carries_the_generated_token(mode: str) -> None:
    """repetition_penalty changes the choice: c.token is the generated token, a warning says
    once that the argmax is another, and c[c.token] explains the token in the text."""
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(9)
    options = {"max_new_tokens": 8, "do_sample": False, "repetition_penalty": 5.0}
    plain = llama_attrib.unwrap(model).generate(ids, **options)
    llama_attrib.wrap(model)
    with pytest.warns(GeneratedTokenWarning, match="not the argmax") as caught:
        out = model.generate(ids, decompose=mode, return_dict_in_generate=True, **options)
    assert len(caught) == 1
    assert torch.equal(out.sequences, plain)
    differs = 0
    for k, c in enumerate(out["attentions"]):
        assert c.token == int(plain[0, 9 + k])
        differs += int(c.recovery.argmax(0)) != c.token
        assert torch.allclose(c[c.token].components.sum(), c.logits[c.token], atol=1e-4)
    assert differs > 0


def test_greedy_generation_warns_nothing() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeneratedTokenWarning)
        out = model.generate(prompt(9), decompose=True, return_dict_in_generate=True, max_new_tokens=4)
    assert [c.token for c in out["attentions"]] == out.sequences[0, 9:].tolist()


@pytest.mark.parametrize(
    ("module", "extra", "call"),
    [
        ("pandas", "viz", lambda r: r.to_dataframe()),
        ("matplotlib", "viz", lambda r: r.plot()),
    ],
)
def test_missing_optional_dependency_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, extra: str, call
) -> None:  # type: ignore[no-untyped-def]
    result = llama_attrib.attribute(tiny_model(2), tiny_tokenizer(), "the cat sat", max_new_tokens=2)
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(ImportError, match=rf"pip install 'llama_attrib\[{extra}\]'"):
        call(result)
