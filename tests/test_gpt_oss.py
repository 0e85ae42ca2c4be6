"""GPT-OSS beyond the families' common tests (tests/test_families.py runs its tiny config in
both modes against the independent reference): the sinks' and the offsets' place in the
account, the 4.57 reference's loop against the stock one, and the rule sets that refuse it
(``load()`` and the CLI on a saved checkpoint: tests/test_loading.py)."""

from __future__ import annotations

import pytest
import torch

import llama_attrib
from conftest import _experts_4x, gradient_x_input, prompt
from test_families import family_model, generated_under


def test_the_sinks_and_the_offsets_belong_to_no_token() -> None:
    """The sinks' mass reaches no value, and the ``+ 1`` offset, the up biases and the clamps'
    constants are the bias share: with the sinks at -inf (no mass) the components change, and
    the bias share is far from zero; components + shares = the stock logit either way."""
    model = family_model("gpt_oss")
    ids = prompt(9)[0]
    (with_sinks,) = llama_attrib.decompose_sequence(model, ids, 8)
    token = int(ids[8])
    with torch.no_grad():
        logit = float(model(ids[None, :8]).logits[0, -1, token])
    got = with_sinks[token]
    assert abs(float(got.components.sum()) + sum(float(v) for v in got.shares.values()) - logit) < 1e-5 * abs(
        logit
    )
    assert abs(float(got.shares["bias"])) > 1e-2
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-torch.inf)
    (without,) = llama_attrib.decompose_sequence(model, ids, 8)
    components, _, _ = gradient_x_input(model, ids[None, :8], token)
    assert torch.allclose(without[token].components, components, atol=1e-5 * float(components.abs().max()))
    assert float((without[token].components - got.components).abs().max()) > 1e-2


def test_the_4x_reference_loop_is_the_stock_one() -> None:
    """conftest's 4.57 GPT-OSS experts (the stock CPU loop, its gate arithmetic as written in
    conftest) give the stock experts' output exactly."""
    model = family_model("gpt_oss")
    mlp = model.model.layers[1].mlp
    if hasattr(mlp.experts, "_apply_gate"):
        pytest.skip("transformers 5.x: the reference wraps the stock _apply_gate instead")
    hidden = torch.randn(7, 32)
    scores, chosen = mlp.router(hidden)
    with torch.no_grad():
        stock = mlp.experts(hidden, router_indices=chosen, routing_weights=scores)
        ours = _experts_4x(mlp.experts, hidden, chosen, scores)
    assert torch.equal(ours.view(stock.shape), stock)


def test_attnlrp_keeps_an_exact_account_and_generates_the_same_tokens() -> None:
    """Under attnlrp (the sinks inside the softmax the rule differentiates, the clamped experts'
    gate x up and each routing weight x its expert's output half to each side; components
    against the rules as hooks: tests/test_rule_sets.py): generate's tokens are plain
    generation's, and components + bias + unassigned = the stock logit."""
    for got in generated_under(family_model("gpt_oss"), "attnlrp"):
        assert abs(float(got.shares["unassigned"])) > 1e-4 and abs(float(got.shares["bias"])) > 1e-3


def test_the_path_rule_set_refuses_the_sinks_before_any_work() -> None:
    model = family_model("gpt_oss")
    ids = prompt(9)
    before = model(ids).logits
    calls: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(llama_attrib.UnsupportedOptionError, match=r"attention sinks.*rules='attnlrp'"):
            llama_attrib.decompose_sequence(model, ids[0], 5, rules="attnlrp-path")
        with pytest.raises(llama_attrib.UnsupportedOptionError, match="attention sinks"):
            llama_attrib.wrap(model, rules="attnlrp-path")
    finally:
        handle.remove()
    assert calls == [] and not llama_attrib.is_wrapped(model)
    assert torch.equal(model(ids).logits, before)
