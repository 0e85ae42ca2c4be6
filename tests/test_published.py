"""Gemma 3 and Mistral Small 3 as they are published: the text model inside a multimodal
wrapper (``Gemma3ForConditionalGeneration``, ``Mistral3ForConditionalGeneration``). The text
path decomposes as the text families do, in both modes, against the independent reference;
image inputs are refused before any work, and the model is left as it was."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
)

import llama_attrib
from conftest import prompt, tiny_tokenizer
from test_families import BASE, GEN, matches_the_reference
from test_wrap import snapshot

VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION |= {"image_size": 28, "patch_size": 14}


def published(name: str) -> nn.Module:
    if name == "gemma3":
        text = {"model_type": "gemma3_text", **BASE, "sliding_window": 4}
        text["layer_types"] = ["sliding_attention", "full_attention"]
        config: Any = Gemma3Config(
            text_config=text,
            vision_config={"model_type": "siglip_vision_model", **VISION},
            mm_tokens_per_image=4,
            image_token_index=95,
            boi_token_index=93,
            eoi_token_index=94,
        )
        cls: Any = Gemma3ForConditionalGeneration
    else:
        config = Mistral3Config(
            text_config={"model_type": "mistral", **BASE, "sliding_window": 4},
            vision_config={"model_type": "pixtral", **VISION, "head_dim": 8},
            image_token_index=95,
        )
        cls = Mistral3ForConditionalGeneration
    config._attn_implementation = "eager"
    torch.manual_seed(len(name))
    model = cls(config)
    with torch.no_grad():  # larger weights: attention far from uniform, gates and norms matter
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


@pytest.mark.parametrize("mode", ["target", "forward"])
@pytest.mark.parametrize("name", ["gemma3", "mistral3"])
def test_the_text_path_matches_the_independent_reference(name: str, mode: str) -> None:
    steps = list(matches_the_reference(published(name), mode, name))
    assert len(steps) == GEN["max_new_tokens"]


@pytest.mark.parametrize("name", ["gemma3", "mistral3"])
def test_image_inputs_are_refused_before_any_work(name: str) -> None:
    model = published(name)
    before = snapshot(model)
    ids = prompt(9)
    pixels = torch.zeros(1, 3, 28, 28)
    llama_attrib.wrap(model)
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="text path of a multimodal model"):
        model.generate(ids, decompose=True, pixel_values=pixels, **GEN)
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="pixel_values"):
        model(ids, decompose="forward", pixel_values=pixels)
    llama_attrib.unwrap(model)
    assert snapshot(model) == before
    steps = llama_attrib.decompose_sequence(model, ids[0], 5)  # text alone: no wrap needed
    assert len(steps) == 4 and snapshot(model) == before


@pytest.mark.parametrize("name", ["gemma3", "mistral3"])
def test_load_gives_the_published_class(name: str, tmp_path: Any) -> None:
    """``models.load()`` (and so the CLI, the runner and the server) loads a published checkpoint
    as its multimodal class (Mistral 3 has no causal-LM auto class: the image-text one)."""
    from llama_attrib.models import load

    model = published(name)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, _ = load(str(tmp_path), "eager")
    assert type(loaded) is type(model)
    ids = prompt(9)[0]
    got = llama_attrib.decompose_sequence(loaded, ids, 6)
    want = llama_attrib.decompose_sequence(model, ids, 6)
    for c, d in zip(got, want, strict=True):
        token = int(d.recovery.argmax())
        assert torch.allclose(c[token].components, d[token].components, atol=1e-6, rtol=0)
