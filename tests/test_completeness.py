"""Components sum to the real logit, on random tiny configs of every supported kind."""

from __future__ import annotations

import pytest
import torch

import llama_attrib
from conftest import ROPE_SCALINGS, prompt, tiny_model
from llama_attrib.targets import Token

CONFIGS = [
    pytest.param(kv, rope, tied, attn, id=f"kv{kv}-{rope}-{'tied' if tied else 'untied'}-{attn}")
    for kv, rope, tied, attn in [
        (4, "default", False, "eager"),
        (2, "default", True, "sdpa"),
        (1, "default", False, "sdpa"),
        *[(2, rope, rope == "yarn", "sdpa") for rope in ROPE_SCALINGS if rope != "default"],
    ]
]


def relative_error(c: llama_attrib.LogitComposition, logits: torch.Tensor) -> float:
    """Largest |sum of components - real logit| over the vocabulary, relative to max |logit|."""
    total = c.components.sum(0)
    return float((total - logits.detach()).abs().max() / logits.detach().abs().max())


@pytest.mark.parametrize("mode", ["target", "forward"])
@pytest.mark.parametrize(("kv", "rope", "tied", "attn"), CONFIGS)
def test_forward_and_generation_complete(kv: int, rope: str, tied: bool, attn: str, mode: str) -> None:
    model = llama_attrib.wrap(tiny_model(kv, rope, tied, attn))
    ids = prompt(9)
    out = model(ids, decompose=mode)
    c = out["attentions"]
    assert c.shape == (96,) and c.numc() == 9
    assert relative_error(c, out.logits[0, -1]) <= 1e-5
    gen = model.generate(
        ids,
        decompose=mode,
        use_cache=True,
        return_dict_in_generate=True,
        output_attentions=True,
        output_scores=True,
        max_new_tokens=6,
        do_sample=False,
    )
    assert len(gen["attentions"]) == 6
    for k, (c, scores) in enumerate(zip(gen["attentions"], gen.scores, strict=True)):
        assert c.numc() == 9 + k
        assert relative_error(c, c.logits) <= 1e-5
        if mode == "forward":
            # the logits the components sum to are generate's own scores (greedy, no processors)
            assert torch.equal(c.logits, scores[0])
        else:
            # target mode sums to one teacher-forced pass: generate's scores up to rounding
            assert relative_error(c, scores[0]) <= 1e-5
            token = int(gen.sequences[0, 9 + k])
            assert torch.equal(c[token].components, c.target.components)
            assert c.target_key == Token(token)
            # target mode's recovery is the stock logits: its argmax says nothing of the pass;
            # the token's components and bias share add up to generate's own score of it
            total = float(c[token].components.sum() + c[token].residual)
            assert abs(total - float(scores[0, token])) <= 1e-5 * float(scores[0].abs().max())
        if mode == "forward":  # forward mode's recovery is its components' sum: the documented loop
            assert int(c.recovery.argmax(0)) == int(gen.sequences[0, 9 + k])


# Measured (5 prompts x 6 steps, max over the vocabulary, relative to the largest logit):
# forward mode 1.7e-3 / 1.2e-2, target mode 9.1e-3 / 3.8e-2 (float16 / bfloat16).
HALF_BOUNDS = {
    ("forward", torch.float16): 5e-3,
    ("forward", torch.bfloat16): 3e-2,
    ("target", torch.float16): 1.5e-2,
    ("target", torch.bfloat16): 6e-2,
}


@pytest.mark.parametrize("mode", ["target", "forward"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_bounds(dtype: torch.dtype, mode: str) -> None:
    """Components are accumulated in float32; the gap to the half-precision logits is the
    model's own rounding (target mode: a float32 pass over the half weights). See the README."""
    bound = HALF_BOUNDS[mode, dtype]
    model = llama_attrib.wrap(tiny_model(2, dtype=dtype))
    ids = prompt(9)
    gen = model.generate(
        ids,
        decompose=mode,
        return_dict_in_generate=True,
        output_scores=True,
        max_new_tokens=4,
        do_sample=False,
    )
    for c, scores in zip(gen["attentions"], gen.scores, strict=True):
        assert c.dtype == torch.float32
        real = scores[0].float()
        err = float((c.components.sum(0) - real).abs().max() / real.abs().max())
        assert err <= bound
    reference = llama_attrib.unwrap(model).generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen.sequences, reference)


def test_float32_components_against_float64() -> None:
    """float32 components agree with the same decomposition run in float64."""
    ids = prompt(9)
    c32 = llama_attrib.wrap(tiny_model(2))(ids, decompose=True)["attentions"]
    c64 = llama_attrib.wrap(tiny_model(2, dtype=torch.float64))(ids, decompose=True)["attentions"]
    assert torch.allclose(c32.components.double(), c64.components, atol=1e-4, rtol=1e-4)
