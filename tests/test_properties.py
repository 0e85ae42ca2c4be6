"""Property-based tests (hypothesis) over random small Llama configs, prompts and paddings."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import llama_attrib
from conftest import ROPE_SCALINGS
from test_wrap import snapshot

# derandomized: the same examples on every run, so that a failure in CI can be rerun here
SETTINGS = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
TOL = {"atol": 1e-5, "rtol": 1e-4}


@st.composite
def configs(draw: Any) -> LlamaConfig:
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=heads * head_dim,
        intermediate_size=draw(st.integers(8, 48)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])),
        max_position_embeddings=64,
        rope_scaling=ROPE_SCALINGS[draw(st.sampled_from(["default", "linear", "llama3"]))],
        tie_word_embeddings=draw(st.booleans()),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = draw(st.sampled_from(["eager", "sdpa"]))
    return config


def build(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def ids_of(tokens: list[int]) -> torch.Tensor:
    return torch.tensor([[1, *tokens]])


tokens = st.lists(st.integers(3, 49), min_size=1, max_size=12)


@SETTINGS
@given(configs(), st.integers(0, 2**16), tokens)
def test_components_sum_to_the_logits_and_modes_agree(
    config: LlamaConfig, seed: int, toks: list[int]
) -> None:
    model = llama_attrib.wrap(build(config, seed))
    ids = ids_of(toks)
    c = model(ids, decompose=True)["attentions"]
    logits = model(ids).logits[0, -1].detach()
    assert torch.allclose(c.recovery, logits, atol=1e-5 * float(logits.abs().max()) + 1e-6)
    target = llama_attrib.decompose_sequence(model, ids)[0]
    pred = int(logits.argmax())
    assert torch.allclose(target[pred].components, c[pred].components, **TOL)


@SETTINGS
@given(configs(), st.integers(0, 2**16), tokens)
def test_cached_equals_uncached_and_target_equals_forward(
    config: LlamaConfig, seed: int, toks: list[int]
) -> None:
    model = llama_attrib.wrap(build(config, seed))
    ids = ids_of(toks)
    options = {"return_dict_in_generate": True, "max_new_tokens": 3, "do_sample": False}
    cached = model.generate(ids, decompose="forward", use_cache=True, **options)
    uncached = model.generate(ids, decompose="forward", use_cache=False, **options)
    target = model.generate(ids, decompose=True, **options)
    assert torch.equal(cached.sequences, target.sequences)
    steps = zip(cached["attentions"], uncached["attentions"], target["attentions"], strict=True)
    for k, (a, b, t) in enumerate(steps):
        token = int(cached.sequences[0, ids.shape[1] + k])
        assert torch.allclose(a[token].components, b[token].components, **TOL)
        assert torch.allclose(a[token].components, t[token].components, **TOL)


@SETTINGS
@given(configs(), st.integers(0, 2**16), st.lists(tokens, min_size=2, max_size=3))
def test_left_padded_batch_rows_equal_single_runs(
    config: LlamaConfig, seed: int, rows: list[list[int]]
) -> None:
    model = llama_attrib.wrap(build(config, seed))
    singles = [ids_of(r)[0] for r in rows]
    width = max(len(s) for s in singles)
    ids = torch.stack([torch.cat([torch.zeros(width - len(s), dtype=torch.long), s]) for s in singles])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(s)] for s in singles])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate does: each row counts from its first token
    for mode in ("forward", "target"):
        batch = model(ids, attention_mask=mask, position_ids=positions, decompose=mode)["attentions"]
        for row, single in enumerate(singles):
            alone = model(single[None], decompose=mode)["attentions"]
            pad = width - len(single)
            token = int(alone.recovery.argmax())
            scores = batch[row, token].components
            assert torch.equal(scores[:pad], torch.zeros(pad))  # padding contributes exactly 0
            assert torch.allclose(scores[pad:], alone[token].components, **TOL)


@SETTINGS
@given(configs(), st.integers(0, 2**16), tokens)
def test_unwrap_is_the_identity(config: LlamaConfig, seed: int, toks: list[int]) -> None:
    model = build(config, seed)
    ids = ids_of(toks)
    state, logits = snapshot(model), model(ids).logits
    with llama_attrib.decompose(model):
        model.generate(ids, max_new_tokens=2, do_sample=False)
        model(ids)
    assert snapshot(model) == state
    assert torch.equal(model(ids).logits, logits)
