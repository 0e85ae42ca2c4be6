"""The products' precision: one option, resolved per model and device, and torch's global
setting put back after the call."""

from __future__ import annotations

import pytest
import torch

import llama_attrib
from conftest import prompt, tiny_model
from llama_attrib import precision

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_auto_takes_tf32_only_for_a_half_precision_model_on_cuda() -> None:
    assert precision.resolve(None, torch.bfloat16, CUDA) == "tf32"
    assert precision.resolve("auto", torch.float16, CUDA) == "tf32"
    assert precision.resolve("auto", torch.float32, CUDA) == "float32"
    assert precision.resolve("auto", torch.bfloat16, CPU) == "float32"
    assert precision.resolve("tf32", torch.float32, CPU) == "tf32"  # asked for: no effect on a CPU
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="auto, float32, tf32"):
        precision.resolve("fp8", torch.float32, CUDA)


def test_the_setting_is_the_call_s_and_is_put_back_also_after_an_error() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with precision.products("tf32", CUDA):
            assert torch.get_float32_matmul_precision() == "high"
        with precision.products("float32", CUDA):
            assert torch.get_float32_matmul_precision() == "highest"
        with pytest.raises(RuntimeError), precision.products("tf32", CUDA):
            raise RuntimeError
        assert torch.get_float32_matmul_precision() == "medium"
        with precision.products("tf32", CPU):  # the CPU's products are float32 whatever it says
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_every_target_entry_point_takes_it_and_forward_mode_refuses_tf32() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(9)
    exact = llama_attrib.decompose_sequence(model, ids, prompt_length=6)
    asked = llama_attrib.decompose_sequence(model, ids, prompt_length=6, precision="float32")
    for a, b in zip(exact, asked, strict=True):
        token = int(a.recovery.argmax())
        assert torch.equal(a[token].components, b[token].components)
    # on the CPU, products are float32 whatever is asked: "tf32" gives the float32 numbers
    answer = llama_attrib.decompose_answer(model, ids, prompt_length=6, precision="tf32")
    plain = llama_attrib.decompose_answer(model, ids, prompt_length=6, precision="float32")
    assert torch.equal(answer.components, plain.components) and torch.equal(answer.residual, plain.residual)
    out = model.generate(
        ids, decompose=True, precision="tf32", max_new_tokens=2, return_dict_in_generate=True
    )
    again = model.generate(ids, decompose=True, max_new_tokens=2, return_dict_in_generate=True)
    assert len(out["attentions"]) == 2
    for c, d in zip(out["attentions"], again["attentions"], strict=True):
        token = int(c.recovery.argmax())
        assert torch.equal(c[token].components, d[token].components)
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="target mode"):
        llama_attrib.decompose_sequence(model, ids, prompt_length=6, mode="forward", precision="tf32")
    with pytest.raises(llama_attrib.UnsupportedOptionError, match=r"precision=.fp8."):
        llama_attrib.decompose_sequence(model, ids, prompt_length=6, precision="fp8")
