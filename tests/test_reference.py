"""Parity with the golden numbers of PyDec's dec_llama (tests/data/reference, see its README)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import llama_attrib
from conftest import reference_case

# about twice the largest difference measured (1.6e-7 against components up to 0.53, both
# transformers versions, every mode and cache path): float32 summing in another order
TOL = 4e-7


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def reference(request: pytest.FixtureRequest):
    folder, data = reference_case("tiny_mha")
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation=request.param).eval()
    return llama_attrib.wrap(model), data["cases"]


@pytest.mark.parametrize("mode", ["forward", "target"])
def test_forward_matches_reference(reference, mode: str) -> None:
    model, cases = reference
    for case in cases:
        out = model(torch.tensor([case["input_ids"]]), decompose=mode)
        c = out["attentions"]
        pred = c.recovery.argmax(0)
        assert int(pred) == case["forward_pred_token"]
        expected = torch.tensor(case["forward_components"])
        assert torch.allclose(c[pred].components, expected, atol=TOL, rtol=0)


# Forward mode decomposes inside generate, so use_cache changes its path (decomposed value
# cache or whole-prefix recomputation); target mode decomposes the finished sequence.
@pytest.mark.parametrize(("mode", "use_cache"), [("forward", True), ("forward", False), ("target", True)])
def test_generation_matches_reference(reference, mode: str, use_cache: bool) -> None:
    model, cases = reference
    for case in cases:
        ids = torch.tensor([case["input_ids"]])
        steps = case["steps"]
        out = model.generate(
            ids,
            decompose=mode,
            use_cache=use_cache,
            return_dict_in_generate=True,
            output_attentions=True,
            max_new_tokens=len(steps),
            do_sample=False,
        )
        assert out.sequences[0].tolist() == case["sequence"]
        assert len(out["attentions"]) == len(steps)
        for c, step in zip(out["attentions"], steps, strict=True):
            pred = c.recovery.argmax(dim=0)
            assert int(pred) == step["token"]
            got = c[pred].components
            assert got.shape == (len(step["components"]),)
            assert torch.allclose(got, torch.tensor(step["components"]), atol=TOL, rtol=0)
