"""The rules' chunking and cache growth change nothing but memory and speed."""

from __future__ import annotations

import pytest
import torch

import llama_attrib
from conftest import prompt, tiny_model
from llama_attrib import rules


def test_chunked_and_unchunked_components_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(40, seed=5)
    # forward mode: the only mode whose components go through the chunking
    options = {
        "decompose": "forward",
        "return_dict_in_generate": True,
        "max_new_tokens": 3,
        "do_sample": False,
    }
    monkeypatch.setattr(rules.linear, "CHUNK_ELEMENTS", 1 << 40)  # one chunk: no triangle skipping
    whole = model.generate(ids, **options)
    monkeypatch.setattr(rules.linear, "CHUNK_ELEMENTS", 1)  # one component per chunk
    chunked = model.generate(ids, **options)
    assert torch.equal(whole.sequences, chunked.sequences)
    for a, b in zip(whole["attentions"], chunked["attentions"], strict=True):
        assert torch.allclose(a.components, b.components, atol=1e-5, rtol=1e-5)


def test_value_cache_grows_without_losing_values() -> None:
    cache = rules.ValueCache()
    values, residuals = [], []
    for step, q in enumerate([5, 1, 12, 1, 30]):
        end = cache.length + q
        v, r = torch.randn(end, 1, 2, q, 4), torch.randn(1, 2, q, 4)
        values.append(torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, 0, 0, 49 - end)))
        residuals.append(r)
        all_values, all_residual = cache.append(v, r)
        assert all_values.shape == (end, 1, 2, end, 4), step
        assert all_residual is not None and all_residual.shape == (1, 2, end, 4), step
    assert torch.equal(all_values, torch.cat(values, dim=3)[:49])
    assert torch.equal(all_residual, torch.cat(residuals, dim=2))


def test_value_cache_refuses_mismatched_components() -> None:
    cache = rules.ValueCache()
    with pytest.raises(llama_attrib.DecompositionError, match="components"):
        cache.append(torch.randn(5, 1, 2, 3, 4))
