"""The split of a logit over source x layer x head/MLP (llama_attrib.flow), against direct
logit attribution computed here with forward hooks on the stock model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import llama_attrib
from conftest import frozen_factors, prompt, tiny_model, tiny_tokenizer
from test_families import FAMILIES, family_model, refused_here

POST_NORMS = {"gemma2", "gemma3_text", "olmo2"}  # norms on the block outputs, before the add


# where each layout keeps its layers, and each block's output projection
LAYOUTS = {
    "gpt2": ("transformer", "h", "attn", "c_proj"),
    "gpt_neox": ("gpt_neox", "layers", "attention", "dense"),
}
LLAMA_LAYOUT = ("model", "layers", "self_attn", "o_proj")


def direct_logit_attribution(
    model: nn.Module, name: str, ids: torch.Tensor, token: int, mask: torch.Tensor | None = None
) -> dict[str, Any]:
    """Each head's and MLP's direct contribution to ``token``'s logit at the last position,
    from the stock model: the output projection's input split by head (its bias shared
    evenly over the heads), the MLP output, the post-norm ratios out/in at that position, and
    what the logit reads of the final norm's input (the gradient there, the final norm's factor
    frozen by conftest's hooks). Also the stock logit, and the final norm's bias's share."""
    base_name, layers_name, attention_name, out_name = LAYOUTS.get(name, LLAMA_LAYOUT)
    base = getattr(model, base_name)
    layers = list(getattr(base, layers_name))
    seen: dict[str, torch.Tensor] = {}
    hooks = []

    def save(key: str, which: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            x = args[0] if which == "in" else (out[0] if isinstance(out, tuple) else out)
            if which == "ratio":
                x = out / args[0]
            seen[key] = x[0, -1].detach().float()

        return hook

    final: list[torch.Tensor] = []

    def final_leaf(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        final.append(args[0].detach().requires_grad_(True))
        return (final[-1], *args[1:])

    for i, layer in enumerate(layers):
        attention = getattr(layer, attention_name)
        hooks.append(getattr(attention, out_name).register_forward_hook(save(f"z{i}", "in")))
        mlp = getattr(layer, "mlp", None) or layer.block_sparse_moe  # Mixtral on transformers 4.x
        hooks.append(mlp.register_forward_hook(save(f"mlp{i}", "out")))
        if name in POST_NORMS:
            hooks.append(layer.post_attention_layernorm.register_forward_hook(save(f"pa{i}", "ratio")))
            hooks.append(layer.post_feedforward_layernorm.register_forward_hook(save(f"pf{i}", "ratio")))
    final_norm = next(m for n, m in base.named_children() if n in ("norm", "ln_f", "final_layer_norm"))
    hooks.append(final_norm.register_forward_pre_hook(final_leaf))
    try:
        with frozen_factors(model) as head_out:
            logits = model(ids, attention_mask=mask, use_cache=False).logits
            # the logit before a final soft-cap (Gemma 2), as flow explains it
            logit = (head_out[-1] if getattr(model.config, "final_logit_softcapping", None) else logits)[
                0, -1, token
            ]
            (read,) = torch.autograd.grad(logit, final[-1])
    finally:
        for h in hooks:
            h.remove()
    read = read[0, -1].float()
    bias = getattr(final_norm, "bias", None)
    final_bias = 0.0
    if bias is not None:  # what the final norm's bias alone gives the logit: the head row's share
        head = model.get_output_embeddings().weight[token].detach().float()
        final_bias = float(head @ bias.detach().float()) / float(getattr(model.config, "logits_scaling", 1.0))
    # Granite (from its modeling code): each block's output joins the residual stream times
    # residual_multiplier
    read = read * float(getattr(model.config, "residual_multiplier", 1.0))
    parts = []
    for i, layer in enumerate(layers):
        attention = getattr(layer, attention_name)
        out_proj = getattr(attention, out_name)
        hd = int(
            getattr(attention, "v_head_dim", None)
            or getattr(attention, "head_dim", None)
            or attention.head_size
        )
        # a Conv1D (GPT-2) stores its weight [in, out]
        w_o = out_proj.weight.detach().float()
        w_o = w_o.T if type(out_proj).__name__ == "Conv1D" else w_o
        z = seen[f"z{i}"]
        v_attn = read * seen[f"pa{i}"] if name in POST_NORMS else read
        v_mlp = read * seen[f"pf{i}"] if name in POST_NORMS else read
        heads = z.numel() // hd
        b_o = 0.0 if out_proj.bias is None else float(out_proj.bias.detach().float() @ v_attn) / heads
        per_head = [
            float((w_o[:, h * hd : (h + 1) * hd] @ z[h * hd : (h + 1) * hd]) @ v_attn) + b_o
            for h in range(heads)
        ]
        parts.append([*per_head, float(seen[f"mlp{i}"] @ v_mlp)])
    return {
        "parts": torch.tensor(parts),
        "logit": float(logit.detach()),
        "final_bias": final_bias,
        "read": read,
    }


@pytest.mark.parametrize("name", ["llama", *FAMILIES])
def test_flow_matches_direct_logit_attribution(name: str) -> None:
    model = tiny_model(2) if name == "llama" else family_model(name)
    if refused_here(name):
        pytest.skip(f"{refused_here(name)}: refused (tests/test_families.py)")
    if name == "granitemoehybrid":  # its Mamba-2 layers are neither heads nor MLPs
        calls: list[int] = []
        handle = model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
        with pytest.raises(llama_attrib.UnsupportedOptionError, match="state-space layers"):
            llama_attrib.flow(model, prompt(9))
        handle.remove()
        assert calls == []
        return
    ids = prompt(9)
    result = llama_attrib.flow(model, ids)
    token = int(result.target)
    reference = direct_logit_attribution(model, name, ids, token)
    scale = abs(reference["logit"]) + 1.0
    assert result.scores.shape == (9, 2, 5)
    # the sum is the stock logit
    assert abs(result.final_bias - reference["final_bias"]) <= 1e-5 * scale
    total = float(result.scores.sum() + result.embedding.sum() + result.bias.sum()) + result.final_bias
    assert abs(total - reference["logit"]) <= 1e-5 * scale
    assert abs(result.logit - reference["logit"]) <= 1e-5 * scale
    # over sources (and the biases' share): each head's and MLP's direct logit attribution
    assert torch.allclose(result.scores.sum(0) + result.bias, reference["parts"], atol=1e-5 * scale, rtol=0)
    # over layers and parts: the per-token decomposition of the same logit
    (c,) = llama_attrib.decompose_sequence(model, ids, mode="forward")
    per_token = result.scores.sum((1, 2)) + result.embedding
    assert torch.allclose(per_token, c[token].components.float(), atol=1e-5 * scale, rtol=0)
    # the residual stream after the last layer is that decomposition too; each layer adds its blocks
    assert torch.allclose(result.stream[-1], c[token].components.float(), atol=1e-5 * scale, rtol=0)
    steps = result.stream[1:] - result.stream[:-1]
    assert torch.allclose(steps, result.scores.sum(-1).T, atol=1e-5 * scale, rtol=0)
    assert torch.equal(result.embedding[:-1], torch.zeros(8))  # only the token at the position
    assert not llama_attrib.is_wrapped(model)


def test_flow_of_a_contrast_and_a_position() -> None:
    model = tiny_model(2)
    ids = prompt(12)
    a, b = 5, 7
    contrast = llama_attrib.flow(model, ids, position=6, target=(a, b))
    first = llama_attrib.flow(model, ids, position=6, target=a)
    second = llama_attrib.flow(model, ids, position=6, target=b)
    assert contrast.scores.shape[0] == 7  # sources up to the position
    assert torch.allclose(contrast.scores, first.scores - second.scores, atol=1e-5)
    assert abs(contrast.logit - (first.logit - second.logit)) <= 1e-5
    # position 6 of 12 tokens is the last position of the first 7: the reference there
    reference = direct_logit_attribution(model, "llama", ids[:, :7], a)
    scale = abs(reference["logit"]) + 1.0
    assert abs(first.logit - reference["logit"]) <= 1e-5 * scale
    assert torch.allclose(first.scores.sum(0) + first.bias, reference["parts"], atol=1e-5 * scale, rtol=0)


def per_source_and_head(
    model: nn.Module, ids: torch.Tensor, token: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[sources, layers, heads + 1]`` from the stock Llama, one block at a time: gradient x
    input over the embeddings of what one head (or the MLP) of one layer writes at the last
    position, read by the logit (the final norm's factor frozen: the read vector of
    :func:`direct_logit_attribution`), with conftest's frozen factors. Independent of flow's
    forward pass: every (layer, head) is its own backward."""
    layers = list(model.model.layers)
    heads = model.config.num_attention_heads
    hd = model.config.hidden_size // heads
    kept: dict[str, torch.Tensor] = {}

    def keep(key: str, which: int) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            kept[key] = (args[0] if which == 0 else out)[0, -1]

        return hook

    read = direct_logit_attribution(model, "llama", ids, token, mask)["read"]  # the final norm frozen
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.o_proj.register_forward_hook(keep(f"z{i}", 0)))
        hooks.append(layer.mlp.register_forward_hook(keep(f"m{i}", 1)))
    scores = torch.zeros(ids.shape[1], len(layers), heads + 1)
    try:
        with frozen_factors(model):
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            for i, layer in enumerate(layers):
                w_o = layer.self_attn.o_proj.weight
                z = kept[f"z{i}"]
                blocks = [w_o[:, h * hd : (h + 1) * hd] @ z[h * hd : (h + 1) * hd] for h in range(heads)]
                for h, block in enumerate([*blocks, kept[f"m{i}"]]):
                    (grad,) = torch.autograd.grad(block.float() @ read, embeds, retain_graph=True)
                    scores[:, i, h] = (grad[0].float() * embeds[0].float()).sum(-1).detach()
    finally:
        for handle in hooks:
            handle.remove()
    return scores


@pytest.mark.parametrize("masked", [False, True])
def test_flow_splits_each_source_over_heads_as_an_independent_reference(masked: bool) -> None:
    """The joint source x layer x head split, against a backward per (layer, head), with and
    without an attention mask (two positions masked out: their columns are zero)."""
    model = tiny_model(2)
    ids = prompt(9)
    mask = None
    if masked:
        mask = torch.ones_like(ids)
        mask[0, 3:5] = 0
    result = llama_attrib.flow(model, ids, attention_mask=mask)
    token = int(result.target)
    reference = per_source_and_head(model, ids, token, mask)
    scale = abs(result.logit) + 1.0
    assert torch.allclose(result.scores, reference, atol=1e-5 * scale, rtol=0)
    if masked:
        assert torch.equal(result.scores[3:5], torch.zeros_like(result.scores[3:5]))


def test_chunked_flow_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small memory budget splits the sources into chunks: same numbers."""
    from llama_attrib import memory

    model = tiny_model(2)
    ids = prompt(20)
    whole = llama_attrib.flow(model, ids)
    sizes: list[int] = []
    chunks = memory.forward_chunks

    def spy(*args: Any, **kwargs: Any) -> Any:
        found = chunks(*args, **kwargs)
        sizes.append(found[0])
        return found

    monkeypatch.setattr(memory, "forward_chunks", spy)
    chunked = llama_attrib.flow(model, ids, max_memory=200_000)
    assert sizes and sizes[0] < 20  # the 20 sources went in more than one chunk
    assert torch.allclose(whole.scores, chunked.scores, atol=1e-6)
    assert torch.allclose(whole.stream, chunked.stream, atol=1e-6)


def test_flow_views_and_aggregation(tmp_path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    model = tiny_model(2)
    result = llama_attrib.attribute(model, tiny_tokenizer(), "the cat sat on the mat", max_new_tokens=3)
    f = result.flow(2)
    step = result.token_scores[2, : result.prompt_length + 2]
    assert torch.allclose(f.scores.sum((1, 2)) + f.embedding, torch.tensor(step), atol=1e-4)
    assert f.labels == result.tokens[: result.prompt_length + 2]
    words = result.words()
    g = f.grouped(words.columns[: len(words.columns)], None)
    assert torch.allclose(g.scores.sum(0), f.scores.sum(0), atol=1e-5)
    part = f.only([1, 2])
    assert torch.equal(part.scores, f.scores[[1, 2]]) and part.labels == f.labels[1:3]
    paths = f.top_paths(3)
    assert len(paths) == 3 and abs(paths[0][3]) >= abs(paths[-1][3])
    assert "head" in f.table() or "mlp" in f.table()
    assert f.plot_layers() is not None and f.plot_heads(1) is not None
    page = f.to_html(str(tmp_path / "flow.html"))
    assert page.count('class="la-fl-layer"') == 2 and page.count('class="la-fl-part"') == 2 * 5
    with pytest.raises(ValueError, match="needs the model"):
        words.flow(0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_flow_of_a_half_precision_model(dtype: torch.dtype) -> None:
    """Float32 paths over half weights add up to the model's half-precision logit within its
    own rounding (the bounds of the per-token decomposition), and match the float32 split."""
    ids = prompt(9)
    half = llama_attrib.flow(tiny_model(2, dtype=dtype), ids)
    full = llama_attrib.flow(tiny_model(2, dtype=dtype).float(), ids, target=half.target)
    scale = abs(full.logit) + 1.0
    total = float(half.scores.sum() + half.embedding.sum() + half.bias.sum())
    # measured over 5 prompts, relative to |logit| + 1: the sum within 1.0e-3 (float16) and
    # 5.2e-3 (bfloat16), each path within 1.5e-3 and 9.3e-3 of the float32 split; bounded at
    # about twice that
    bound = {torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert abs(total - half.logit) <= bound * scale
    assert torch.allclose(half.scores, full.scores, atol=bound * scale, rtol=0)
