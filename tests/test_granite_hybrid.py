"""Granite 4.0's hybrid (Mamba-2 layers beside attention) beyond the families' common tests
(tests/test_families.py: both modes against the independent reference, a left-padded batch):
a dense config, the credited rule sets, and a stock model whose cached steps differ from its
full forward (refused, never explained wrongly)."""

from __future__ import annotations

import pytest
import torch

import llama_attrib
from conftest import gradient_x_input, prompt
from llama_attrib import _compat
from test_families import GEN, family_model, generated_under


def _model(**config: object) -> torch.nn.Module:
    model = family_model("granitemoehybrid")
    if not config:
        return model
    from transformers import AutoConfig, AutoModelForCausalLM

    from test_families import BASE, FAMILIES

    built = AutoConfig.for_model("granitemoehybrid", **{**BASE, **FAMILIES["granitemoehybrid"], **config})
    built._attn_implementation = "eager"
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(built)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


@pytest.mark.parametrize("mode", ["target", "forward"])
def test_a_dense_hybrid_with_mamba_layers_only_matches_the_reference(mode: str) -> None:
    """No experts (``block_sparse_moe`` is None: the shared MLP alone) and two Mamba-2 layers."""
    model = _model(num_local_experts=0, layer_types=["mamba", "mamba"])
    layers = model.model.layers
    assert getattr(layers[0], "block_sparse_moe", None) is None and layers[1].self_attn is None
    ids = prompt(9)
    for k, c in enumerate(llama_attrib.decompose_sequence(model, ids[0], 5, mode=mode)):
        token = int(ids[0, 5 + k])
        components, bias, logit = gradient_x_input(model, ids[:, : 5 + k], token)
        scale = float(components.abs().max())
        assert torch.allclose(c[token].components, components, atol=1e-5 * scale, rtol=0), (mode, k)
        assert abs(float(c[token].residual) - bias) <= 1e-5 * max(scale, abs(logit))
        assert abs(float(c[token].components.sum() + c[token].residual) - logit) <= 1e-5 * max(
            scale, abs(logit)
        )


@pytest.mark.parametrize("ruleset", ["attnlrp", "attnlrp-path"])
def test_the_credited_rule_sets_keep_an_exact_account(ruleset: str) -> None:
    """Under AttnLRP's rules (MambaLRP's for the Mamba-2 layers: the gate's product half to
    each side, the selection frozen; components against the rules as hooks in
    tests/test_rule_sets.py): generate's tokens are plain generation's, and components + shares
    = the stock logit, with the softmaxes' unassigned share."""
    for got in generated_under(family_model("granitemoehybrid"), ruleset):
        assert abs(float(got.shares["unassigned"])) > 1e-5


def test_a_model_whose_cached_steps_differ_is_refused_not_explained_wrongly() -> None:
    """With a ``time_step_limit`` the model reaches, transformers 5's recurrent step (generate's
    cached steps; 4.x's applies it) ignores the limit its chunked scan applies: generate's logits then differ
    from a full forward's. Target mode's replay check finds it and says what to do; the
    teacher-forced decomposition of the same sequence still matches the reference. Forward
    mode's own check (components against the real hidden state) finds it as well."""
    model = _model(time_step_limit=(0.0, 1.5))
    ids = prompt(9)
    plain = model.generate(ids, **GEN, output_logits=True)
    with torch.no_grad():
        full = model(plain.sequences[:, :10]).logits[0, -1]
    if _compat.TRANSFORMERS_VERSION.major < 5:  # 4.x's recurrent step applies the limit too
        assert float((plain.logits[1][0] - full).abs().max()) < 1e-4
        with llama_attrib.decompose(model):
            for mode in ("target", "forward"):
                out = model.generate(ids, decompose=mode, **GEN)
                assert torch.equal(out.sequences, plain.sequences), mode
        return
    assert float((plain.logits[1][0] - full).abs().max()) > 1e-2  # the stock model's own difference
    with pytest.raises(llama_attrib.DecompositionError, match="with a cache than without"):
        llama_attrib.wrap(model).generate(ids, decompose=True, **GEN)
    # forward mode follows the cache with the limit applied: its check finds the difference
    with pytest.raises(llama_attrib.DecompositionError, match="do not add up"):
        model.generate(ids, decompose="forward", **GEN)
    llama_attrib.unwrap(model)
    (c,) = llama_attrib.decompose_sequence(model, plain.sequences[0, :11], 10)  # token 10 from 0..9
    token = int(plain.sequences[0, 10])
    components, _, _ = gradient_x_input(model, plain.sequences[:, :10], token)
    assert torch.allclose(c[token].components, components, atol=1e-5 * float(components.abs().max()), rtol=0)


def test_forward_mode_follows_a_padded_batch_generation_step_by_step() -> None:
    """Forward mode keeps each Mamba layer's past (its convolution window and values per
    component) from step to step: on a left-padded batch its components equal target mode's
    (checked against the reference in tests/test_families.py) at every step and row."""
    model = family_model("granitemoehybrid")
    pad = torch.zeros(1, 3, dtype=torch.long)
    ids = torch.cat([prompt(9, seed=1), torch.cat([pad, prompt(6, seed=2)], 1)])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [3]])).long()
    options = {"attention_mask": mask, "pad_token_id": 0, **GEN}
    plain = model.generate(ids, **options)
    with llama_attrib.decompose(model):
        forward = model.generate(ids, decompose="forward", **options)
        target = model.generate(ids, decompose=True, **options)
    assert torch.equal(forward.sequences, plain.sequences) and torch.equal(target.sequences, plain.sequences)
    for k, (a, b) in enumerate(zip(forward["attentions"], target["attentions"], strict=True)):
        for row in range(2):
            token = int(plain.sequences[row, 9 + k])
            scale = float(b[row, token].components.abs().max())
            assert torch.allclose(
                a[row, token].components, b[row, token].components, atol=1e-5 * scale, rtol=0
            )
            assert abs(float(a[row, token].residual - b[row, token].residual)) <= 1e-5 * scale
