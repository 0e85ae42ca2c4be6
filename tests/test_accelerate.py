"""accelerate: models dispatched with disk/CPU offload decompose like the same model in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload, init_empty_weights
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import llama_attrib
from conftest import prompt, tiny_config, tiny_model
from test_wrap import snapshot

GEN = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True}


def disk_offloaded(tmp_path: Path) -> LlamaForCausalLM:
    tiny_model(2).save_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny",
        device_map="auto",
        max_memory={"cpu": "60KB"},  # less than one layer: the layers go to disk
        offload_folder=str(tmp_path / "offload"),
        attn_implementation="sdpa",
    )
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    return model.eval()


def host_offloaded() -> LlamaForCausalLM:
    model = tiny_model(2)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    return model


@pytest.mark.parametrize("kind", ["disk", "cpu_offload"])
def test_offloaded_model_decomposes_like_the_model_in_memory(tmp_path: Path, kind: str) -> None:
    reference = llama_attrib.wrap(tiny_model(2))
    model = disk_offloaded(tmp_path) if kind == "disk" else host_offloaded()
    ids = prompt(9)
    state, logits = snapshot(model), model(ids).logits
    llama_attrib.wrap(model)
    for mode in ("forward", "target"):
        want = reference.generate(ids, decompose=mode, **GEN)
        got = model.generate(ids, decompose=mode, **GEN)
        assert torch.equal(got.sequences, want.sequences)
        for k, (a, b) in enumerate(zip(got["attentions"], want["attentions"], strict=True)):
            token = int(want.sequences[0, 9 + k])
            assert torch.allclose(a[token].components, b[token].components, atol=1e-5, rtol=1e-5)
    after = llama_attrib.decompose_sequence(model, want.sequences, 9, mode="forward")
    assert torch.allclose(after[0].recovery, want["attentions"][0].recovery, atol=1e-5, rtol=1e-5)
    llama_attrib.unwrap(model)
    assert snapshot(model) == state  # accelerate's hooks and per-instance forwards are back
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert torch.equal(model(ids).logits, logits)


def test_meta_weights_without_an_offload_hook_are_refused() -> None:
    with init_empty_weights():
        model = LlamaForCausalLM(tiny_config())
    with pytest.raises(llama_attrib.UnsupportedModelError, match="meta device"):
        llama_attrib.wrap(model.eval())
    assert not llama_attrib.is_wrapped(model)
