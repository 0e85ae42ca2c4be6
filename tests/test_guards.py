"""Each run-time guard fires when its behaviour is broken, with a message that says what to do."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import pytest
import torch

import llama_attrib
from conftest import prompt, tiny_model, tiny_tokenizer
from llama_attrib import rules
from llama_attrib.errors import GeneratedTokenWarning


def _drifting_norm(monkeypatch: pytest.MonkeyPatch, drift: float = 1e-4, only: Any = None) -> None:
    """Break one rule: the norms' frozen factor off by ``drift`` (10x the float32 tolerance by
    default, so a guard loosened 100x would not fire), as a wrong rule for a new family would
    be; ``only``: that norm module alone."""
    real = rules.RMSNorm.factor

    def drifted(self, module, *args, **kwargs):  # type: ignore[no-untyped-def]
        factor = real(self, module, *args, **kwargs)
        return factor if only is not None and module is not only else factor * (1 + drift)

    monkeypatch.setattr(rules.RMSNorm, "factor", drifted)


def test_forward_mode_guard_fires_when_components_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama_attrib.wrap(tiny_model(2))
    _drifting_norm(monkeypatch)
    with pytest.raises(llama_attrib.DecompositionError, match="do not add up"):
        model(prompt(9), decompose="forward")
    with pytest.raises(llama_attrib.DecompositionError, match="do not add up"):
        llama_attrib.decompose_sequence(model, prompt(9), 5, mode="forward")


def test_target_mode_guard_compares_with_the_stock_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Target mode's pass is the rules' own; the guard checks it against the stock logits, so a
    rule that drifts cannot produce numbers that add up to the wrong logit: the final norm's
    drift reaches the logit check, a layer's is caught where the layer runs again."""
    model = llama_attrib.wrap(tiny_model(2))
    _drifting_norm(monkeypatch, only=model.model.norm)
    with pytest.raises(llama_attrib.DecompositionError, match="the model's logit"):
        model.generate(prompt(9), decompose=True, return_dict_in_generate=True, max_new_tokens=2)
    monkeypatch.undo()
    # the answer's check is relative to the summed largest logits of its steps, of which the
    # drifted target logits are a fraction: a larger drift there
    _drifting_norm(monkeypatch, drift=1e-3, only=model.model.norm)
    with pytest.raises(llama_attrib.DecompositionError, match="the model's logits is"):
        llama_attrib.decompose_answer(model, prompt(12), 9)
    monkeypatch.undo()
    _drifting_norm(monkeypatch, only=model.model.layers[0].post_attention_layernorm)
    with pytest.raises(llama_attrib.DecompositionError, match="another output than the one recorded"):
        model.generate(prompt(9), decompose=True, return_dict_in_generate=True, max_new_tokens=2)


def test_flow_guard_fires_when_its_paths_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    """flow() runs its own forward pass: its paths are checked against the stock logit."""
    model = tiny_model(2)
    llama_attrib.flow(model, prompt(9))  # correct code passes
    _drifting_norm(monkeypatch)
    with pytest.raises(llama_attrib.DecompositionError, match="paths add up to"):
        llama_attrib.flow(model, prompt(9))
    assert not llama_attrib.is_wrapped(model)


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
    with pytest.raises(ImportError, match=rf"pip install -e '\.\[{extra}\]'\), or pip install {module}"):
        call(result)
