"""Every supported family, decomposed exactly in both modes, against an independent reference
(conftest.gradient_x_input: gradient x input on the stock model, frozen factors detached by
hooks written in the tests, not by the library's rules)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import llama_attrib
from conftest import gradient_x_input, prompt
from llama_attrib import _compat

BASE = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 4},  # shorter than the 9-token prompt
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {},  # biases on q, k and v
    "qwen3": {},
    # query_pre_attn_scalar away from head_dim (8): a library ignoring the passed scaling fails
    "gemma2": {"sliding_window": 4, "query_pre_attn_scalar": 32},
    "gemma3_text": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "olmo2": {},
    # layer 0 dense, layer 1 sparse (with a shared expert in Qwen2-MoE)
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "mlp_only_layers": [0],
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "mlp_only_layers": [0],
    },
    # attention sinks, alternate sliding windows, biases everywhere; a clamp limit the tiny
    # model's gates and ups cross (the published one is 7)
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "swiglu_limit": 1.5,
        "eos_token_id": 95,  # 4.57's tiny model says 2 at its first step
        "max_position_embeddings": 131072,  # YaRN's factor 32 over 4096, as published
    },
    # latent attention (low-rank queries too; values and keys of other widths), routing by
    # sigmoid scores in groups, a shared expert, a dense first layer
    "deepseek_v3": {
        "num_key_value_heads": 4,
        "q_lora_rank": 16,
        "kv_lora_rank": 8,
        "qk_rope_head_dim": 4,
        "head_dim": 4,  # the rotary part's, as the config sets it
        "qk_nope_head_dim": 4,
        "v_head_dim": 6,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "moe_intermediate_size": 16,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "eos_token_id": 95,
    },
    # Granite 4.0's hybrid: a Mamba-2 layer (chunks shorter than the prompt, biases), then an
    # attention layer; experts and a shared MLP; the multipliers. (A time_step_limit: the stock
    # recurrent step ignores it, so generate's logits differ from a full forward's; see
    # tests/test_granite_hybrid.py)
    "granitemoehybrid": {
        "layer_types": ["mamba", "attention"],  # as published (5.x renames them)
        "mamba_n_heads": 4,
        "mamba_n_groups": 2,
        "mamba_d_state": 8,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": 4,
        "mamba_proj_bias": True,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 16,
        "shared_intermediate_size": 24,
        "position_embedding_type": "rope",
        "embedding_multiplier": 3.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
        "logits_scaling": 4.0,
        "eos_token_id": 95,
    },
    # every multiplier away from 1, and the attention's scaling away from head_dim ** -0.5
    "granite": {
        "embedding_multiplier": 3.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
        "logits_scaling": 4.0,
    },
    "smollm3": {"no_rope_layers": [1, 0]},  # layer 1 without rope
    # parallel residual, rotary on a quarter of each head, LayerNorms, GELU, biases
    "gpt_neox": {"num_key_value_heads": 4, "rotary_pct": 0.25, "use_parallel_residual": True},
    # learned positions, Conv1D, LayerNorms, GELU (tanh), biases
    "gpt2": {"num_key_value_heads": 4, "n_inner": 64},
}
GEN = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True}


def refused_here(name: str) -> str | None:
    """Why a family is refused on this transformers version (checked by
    test_family_matches_the_independent_reference), else None."""
    if _compat.TRANSFORMERS_VERSION.major >= 5:
        return None
    if name == "qwen2_moe":
        return "Qwen2-MoE's 4.x attention is computed inline"
    return None


def family_model(name: str, attn: str = "eager") -> nn.Module:
    config = AutoConfig.for_model(name, **{**BASE, **FAMILIES[name]})
    config._attn_implementation = attn
    torch.manual_seed(len(name))
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights: attention far from uniform, gates and norms matter
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


def generated_under(model: nn.Module, ruleset: str) -> list[Any]:
    """Generate plain and, under ``ruleset``, decomposed from a 9-token prompt: the same tokens,
    and every step's components + shares equal to the stock logit (1e-5 of the largest logit).
    Returns each step's explained Contributions."""
    ids = prompt(9)
    plain = model.generate(ids, **GEN, output_logits=True)
    with llama_attrib.decompose(model, rules=ruleset):
        out = model.generate(ids, decompose=True, **GEN)
    assert torch.equal(out.sequences, plain.sequences), "tokens differ from plain generation"
    explained = []
    for k, c in enumerate(out["attentions"]):
        got = c[int(out.sequences[0, 9 + k])]
        logit = float(plain.logits[k][0, int(out.sequences[0, 9 + k])])
        parts = float(got.components.sum()) + sum(float(v) for v in got.shares.values())
        assert abs(parts - logit) <= 1e-5 * float(plain.logits[k][0].abs().max()), (ruleset, k)
        explained.append(got)
    return explained


def matches_the_reference(model: nn.Module, mode: str, name: str) -> Any:
    """Generate plain and decomposed from a 9-token prompt: the same tokens, and every step's
    components, bias share and sum equal to gradient x input on the stock model (1e-5 of the
    largest logit). Yields ``(step, composition, token, plain logits, bias, logit)``."""
    ids = prompt(9)
    plain = model.generate(ids, **GEN, output_logits=True)
    llama_attrib.wrap(model)
    out = model.generate(ids, decompose=mode, **GEN)
    assert torch.equal(out.sequences, plain.sequences), "tokens differ from plain generation"
    llama_attrib.unwrap(model)
    for k, c in enumerate(out["attentions"]):
        token = int(out.sequences[0, 9 + k])
        components, bias, logit = gradient_x_input(model, out.sequences[:, : 9 + k], token)
        got = c[token]
        scale = float(plain.logits[k][0].abs().max())
        assert torch.allclose(got.components, components, atol=1e-5 * scale, rtol=0), (name, mode, k)
        assert abs(float(got.residual) - bias) <= 1e-5 * scale
        assert abs(float(got.components.sum() + got.residual) - logit) <= 1e-5 * scale
        yield k, c, token, plain.logits[k], bias, logit


@pytest.mark.parametrize("mode", ["target", "forward"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_the_independent_reference(name: str, mode: str) -> None:
    model = family_model(name)
    if name == "qwen2_moe" and not _compat.uses_attention_interface(model.model.layers[0].self_attn):
        # transformers 4.x: its attention is computed inline, refused with what to do
        with pytest.raises(llama_attrib.UnsupportedModelError, match=r"upgrade transformers to 5\.x"):
            llama_attrib.wrap(model)
        assert not llama_attrib.is_wrapped(model)
        return
    checked = 0
    for _, c, token, plain, bias, logit in matches_the_reference(model, mode, name):
        checked += 1
        scale = float(plain[0].abs().max())
        if name == "gemma2":  # final soft-cap 30: reported beside the sum, in both modes
            assert torch.allclose(c.capped[token], plain[0, token], atol=1e-5 * scale)
            assert abs(float(c.capped[token]) - logit) > 1e-3
        if name == "qwen2":
            assert abs(bias) > 1e-3 * scale  # the biases have a share, and it is not a token's
    assert checked == GEN["max_new_tokens"]  # every step was checked


@pytest.mark.parametrize("mode", ["target", "forward"])
@pytest.mark.parametrize(
    "name",
    [
        "mistral",
        "qwen2",
        "qwen3_moe",
        "gemma2",
        "gpt_neox",
        "gpt2",
        "gpt_oss",
        "deepseek_v3",
        "granitemoehybrid",
    ],
)
def test_a_left_padded_batch_matches_the_reference(name: str, mode: str) -> None:
    """Each row of a left-padded batch against the independent reference with the same mask and
    positions: a sliding window over padding, a bias share at pad positions, pad rows through
    the router, learned positions. The pads' components are exactly zero."""
    if refused_here(name):
        pytest.skip(str(refused_here(name)))
    model = family_model(name)
    ids = torch.cat(
        [prompt(9, seed=1), torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt(6, seed=2)], 1)]
    )
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [3]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    (c,) = llama_attrib.decompose_sequence(model, ids, attention_mask=mask, position_ids=positions, mode=mode)
    for row in (0, 1):
        token = int(c.logits[row].argmax())
        components, bias, logit = gradient_x_input(
            model, ids, token, row=row, attention_mask=mask, position_ids=positions
        )
        got = c[row, token]
        scale = float(c.logits[row].abs().max())
        assert torch.allclose(got.components, components, atol=1e-5 * scale, rtol=0), (name, mode, row)
        assert abs(float(got.residual) - bias) <= 1e-5 * scale
        assert abs(float(got.components.sum() + got.residual) - logit) <= 1e-5 * scale
    assert torch.equal(c[1, token].components[:3], torch.zeros(3))


def test_sliding_window_is_shorter_than_the_prompt() -> None:
    """Mistral's window (4) binds on a 9-token prompt: the probabilities are those of the
    window, so decomposing with a full-attention model would give other numbers."""
    model = family_model("mistral")
    ids = prompt(9)
    windowed = llama_attrib.wrap(model)(ids, decompose=True)["attentions"]
    model = family_model("mistral")
    model.config.sliding_window = None
    full = llama_attrib.wrap(model)(ids, decompose=True)["attentions"]
    token = int(windowed.recovery.argmax())
    assert not torch.allclose(windowed[token].components, full[token].components, atol=1e-3)
    # two layers of a 4-token window: position 8 sees 5-8, which saw 2-8; tokens 0 and 1 are out
    # of reach (exactly zero), tokens 2-4 reach in through the first layer, and without the
    # window every token does
    assert torch.equal(windowed[token].components[:2], torch.zeros(2))
    assert bool((windowed[token].components[2:5] != 0).all())
    assert bool((full[token].components[:2] != 0).all())


@pytest.mark.parametrize("name", ["qwen2", "gemma3_text", "phi3"])
def test_decompose_sequence_and_attribute(name: str) -> None:
    """The after-the-fact and high-level entry points on other families."""
    from conftest import tiny_tokenizer

    model = family_model(name, attn="sdpa")
    ids = prompt(9)
    sequences = model.generate(ids, max_new_tokens=3, do_sample=False)
    target = llama_attrib.decompose_sequence(model, sequences, 9)
    forward = llama_attrib.decompose_sequence(model, sequences, 9, mode="forward")
    for k, (a, b) in enumerate(zip(target, forward, strict=True)):
        token = int(sequences[0, 9 + k])
        assert torch.allclose(a[token].components, b[token].components, atol=1e-4)
        assert torch.allclose(a[token].residual, b[token].residual, atol=1e-4)
    assert not llama_attrib.is_wrapped(model)
    result = llama_attrib.attribute(model, tiny_tokenizer(), "the cat sat", max_new_tokens=2)
    assert result.n_generated == 2
    assert result.bias is not None
    assert np.allclose(np.nansum(result.token_scores, 1) + result.bias, result.logits, atol=1e-4)
    if name == "qwen2":  # the biases' share is shown as such, never as a token's
        assert (np.abs(result.bias) > 1e-3).all()
        assert "(bias)" in result.table() and "no token" in result.table()
        assert (result.to_dataframe()["label"] == "bias").sum() == 2
        shares = result.normalize("share")
        total = np.nansum(np.abs(shares.scores), 1) + np.abs(shares.no_token_scores)
        assert np.allclose(total, 1.0)
    else:
        assert not result.bias.any()


def test_register_family() -> None:
    """A family is a small declarative map: register one under a new model class name."""
    from llama_attrib.families import FAMILIES as KNOWN
    from llama_attrib.families import standard

    model = family_model("llama")

    class MyLlamaForCausalLM(type(model)):  # type: ignore[misc]
        pass

    model.__class__ = MyLlamaForCausalLM
    with pytest.raises(llama_attrib.UnsupportedModelError, match="MyLlamaForCausalLM"):
        llama_attrib.wrap(model)
    family = standard("Llama", name="my-llama")
    family = llama_attrib.Family(**{**family.__dict__, "model_classes": ("MyLlamaForCausalLM",)})
    llama_attrib.register_family(family)
    try:
        ids = prompt(9)
        c = llama_attrib.wrap(model)(ids, decompose=True)["attentions"]
        token = int(c.recovery.argmax())
        components, _, _ = gradient_x_input(llama_attrib.unwrap(model), ids, token)
        assert torch.allclose(c[token].components, components, atol=1e-4)
    finally:
        del KNOWN["MyLlamaForCausalLM"]
