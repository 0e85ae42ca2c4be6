"""Trained weights in other families' layouts: SmolLM2-135M-Instruct's weights moved into Mistral,
Qwen2 (zero q/k/v biases), Granite (unit multipliers) and the language model of Mistral Small 3
as published (Mistral3ForConditionalGeneration), layouts with identical maths. No small
checkpoint of those families ships in a package here, so this is how each family's code path
meets trained weight statistics, not only random ones: the stock logits must equal SmolLM2's,
and the decomposition must be exact against the independent reference, in both modes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import llama_attrib
from conftest import gradient_x_input

pytestmark = pytest.mark.slow

SHARED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
)
# what makes each layout compute exactly Llama's maths
SAME_MATHS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},  # its q/k/v biases are set to zero below
    "granite": {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0},
}


def published_mistral3(llama: nn.Module, options: dict[str, Any]) -> nn.Module:
    """``llama``'s weights as the language model of Mistral Small 3 as published
    (``Mistral3ForConditionalGeneration``: a tiny random vision tower beside it, unused)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    vision = {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "head_dim": 8, "image_size": 28, "patch_size": 14}
    config = Mistral3Config(
        text_config={"model_type": "mistral", **options, "sliding_window": None}, vision_config=vision
    )
    config._attn_implementation = "sdpa"
    model = Mistral3ForConditionalGeneration(config)
    state = {
        f"model.language_model.{k.removeprefix('model.')}": v
        for k, v in llama.state_dict().items()
        if k.startswith("model.")
    }
    state["lm_head.weight"] = llama.get_output_embeddings().weight.detach()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(".vision_tower." in n or ".multi_modal_projector." in n for n in missing), missing
    return model.eval()


def moved(llama: nn.Module, family: str) -> nn.Module:
    """``llama``'s weights in ``family``'s layout (extra parameters zero, e.g. Qwen2's biases)."""
    source = llama.config.to_dict()
    options = {k: source[k] for k in SHARED if source.get(k) is not None}
    if family == "mistral3":
        return published_mistral3(llama, options)
    options.update(SAME_MATHS[family])
    if family == "granite":
        options["attention_multiplier"] = float(llama.config.head_dim) ** -0.5
    config = AutoConfig.for_model(family, **options)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        for name in missing:
            if name.endswith("lm_head.weight"):
                continue  # tied to the embeddings
            assert name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")), name
            model.get_parameter(name).zero_()
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("family", [*SAME_MATHS, "mistral3"])
def test_smollm2_in_another_layout_is_decomposed_exactly(smollm2: tuple[Any, Any], family: str) -> None:
    llama, tokenizer = smollm2
    model = moved(llama, family)
    assert type(model).__name__ != type(llama).__name__
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = llama(ids).logits, model(ids).logits
    scale = float(expected.abs().max())
    assert torch.allclose(got, expected, atol=1e-5 * scale, rtol=0), "the layouts compute different logits"
    # an explicit mask: generate would otherwise mask the prompt's tokens equal to the pad token
    # (on transformers 4.x this tokenizer's EOS is its BOS, the prompt's first token)
    options = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 3, "do_sample": False}
    options["pad_token_id"] = tokenizer.eos_token_id
    plain = model.generate(ids, **options)
    for mode in ("target", "forward"):
        with llama_attrib.decompose(model):
            out = model.generate(ids, decompose=mode, return_dict_in_generate=True, **options)
        assert torch.equal(out.sequences, plain), (family, mode)
        n = ids.shape[1]
        for k, c in enumerate(out["attentions"]):
            token = int(out.sequences[0, n + k])
            components, bias, logit = gradient_x_input(model, out.sequences[:, : n + k], token)
            step_scale = float(c.logits.abs().max())
            assert torch.allclose(c[token].components, components, atol=1e-5 * step_scale, rtol=0), (
                family,
                mode,
                k,
            )
            assert abs(float(c[token].residual) - bias) <= 1e-5 * step_scale
            assert abs(float(c[token].components.sum() + c[token].residual) - logit) <= 1e-5 * step_scale
    assert not llama_attrib.is_wrapped(model)
