"""CUDA paths: device placement, half precision and ``device_map="auto"`` on a GPU.

Skipped where there is no CUDA device (CI never has one); run on a lent GPU machine with
``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import llama_attrib
from conftest import prompt, tiny_model, tiny_tokenizer
from test_wrap import snapshot

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GEN = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}


def _relative(total: torch.Tensor, logits: torch.Tensor) -> float:
    return float((total.float() - logits.float()).abs().max() / logits.float().abs().max())


@pytest.mark.parametrize("mode", ["target", "forward"])
def test_cuda_float32_equals_cpu(mode: str) -> None:
    """The same tiny model on the GPU and the CPU: same tokens, same components, sums = scores."""
    ids = prompt(9)
    cpu = llama_attrib.wrap(tiny_model(2)).generate(ids, decompose=mode, **GEN)
    model = llama_attrib.wrap(tiny_model(2).to("cuda"))
    gpu = model.generate(ids.to("cuda"), decompose=mode, **GEN)
    assert torch.equal(gpu.sequences.cpu(), cpu.sequences)
    for k, (a, b, scores) in enumerate(zip(gpu["attentions"], cpu["attentions"], gpu.scores, strict=True)):
        token = int(cpu.sequences[0, 9 + k])
        assert a[token].components.device.type == "cuda"
        assert torch.allclose(a[token].components.cpu(), b[token].components, atol=1e-4, rtol=1e-4)
        assert _relative(a.components.sum(0), scores[0]) <= 1e-5


@pytest.mark.parametrize("mode", ["target", "forward"])
@pytest.mark.parametrize(("dtype", "bound"), [(torch.float16, 1.5e-2), (torch.bfloat16, 6e-2)])
def test_cuda_half_precision(dtype: torch.dtype, bound: float, mode: str) -> None:
    """Half-precision weights on the GPU: identical tokens to plain generation, float32
    components within the CPU bounds of test_completeness (the model's own rounding)."""
    ids = prompt(9).to("cuda")
    model = tiny_model(2, dtype=dtype).to("cuda")
    plain = model.generate(ids, max_new_tokens=5, do_sample=False)
    llama_attrib.wrap(model)
    out = model.generate(ids, decompose=mode, **GEN)
    assert torch.equal(out.sequences, plain)
    for c, scores in zip(out["attentions"], out.scores, strict=True):
        assert c.dtype == torch.float32
        assert _relative(c.components.sum(0), scores[0]) <= bound
    llama_attrib.unwrap(model)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), plain)


def test_device_map_auto(tmp_path: Path) -> None:
    """A checkpoint loaded with device_map="auto" lands on the GPU and decomposes like the
    same model moved there by hand; unwrap leaves accelerate's dispatch as it was."""
    tiny_model(2).save_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny", device_map="auto", attn_implementation="sdpa"
    ).eval()
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    ids = prompt(9).to("cuda")
    state, logits = snapshot(model), model(ids).logits
    reference = llama_attrib.wrap(tiny_model(2).to("cuda")).generate(ids, decompose=True, **GEN)
    llama_attrib.wrap(model)
    out = model.generate(ids, decompose=True, **GEN)
    assert torch.equal(out.sequences, reference.sequences)
    for k, (a, b) in enumerate(zip(out["attentions"], reference["attentions"], strict=True)):
        token = int(out.sequences[0, 9 + k])
        assert torch.allclose(a[token].components, b[token].components, atol=1e-5, rtol=1e-5)
    after = llama_attrib.decompose_sequence(model, out.sequences, 9)
    for a, b in zip(after, out["attentions"], strict=True):
        token = int(b.recovery.argmax(0))
        assert torch.allclose(a[token].components, b[token].components, atol=1e-4, rtol=1e-4)
    llama_attrib.unwrap(model)
    assert snapshot(model) == state
    assert torch.equal(model(ids).logits, logits)


def test_attribute_on_cuda() -> None:
    """The high-level attribute() call on a GPU model: every row sums to its real logit."""
    model = tiny_model(2).to("cuda")
    result = llama_attrib.attribute(model, tiny_tokenizer(), "the cat sat on the mat", max_new_tokens=4)
    assert result.n_generated == 4
    totals = np.nansum(result.token_scores, axis=1)
    assert np.allclose(totals, result.logits, atol=1e-4, rtol=1e-4)
    assert not llama_attrib.is_wrapped(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_flow_on_cuda(dtype: torch.dtype) -> None:
    """flow() on a GPU model: the same split as on the CPU (float32), and it adds up."""
    ids = prompt(9)
    cpu = llama_attrib.flow(tiny_model(2, dtype=dtype).float(), ids)
    gpu = llama_attrib.flow(tiny_model(2, dtype=dtype).to("cuda"), ids.to("cuda"), target=cpu.target)
    total = float(gpu.scores.sum() + gpu.embedding.sum() + gpu.bias.sum())
    # float32: the decomposition's bound; bfloat16: the model's own rounding (its logit is bf16)
    bound = 1e-4 if dtype == torch.float32 else 6e-2 * (abs(cpu.logit) + 1)
    assert abs(total - gpu.logit) <= bound
    assert torch.allclose(gpu.scores, cpu.scores, atol=bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decompose_answer_on_cuda(dtype: torch.dtype) -> None:
    """A whole answer in one pass on a GPU model: the CPU's components (float32 weights), and
    the sum of the stock model's own logits of the answer (within bfloat16's rounding)."""
    ids = prompt(9)
    cpu_model = tiny_model(2, dtype=dtype).float()
    sequences = cpu_model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    cpu = llama_attrib.decompose_answer(cpu_model, sequences, 9)
    model = tiny_model(2, dtype=dtype).to("cuda")
    gpu = llama_attrib.decompose_answer(model, sequences.to("cuda"), 9)
    assert gpu.components.device.type == "cuda" and gpu.components.dtype == torch.float32
    with torch.no_grad():
        logits = model(sequences.to("cuda")).logits[0, 8:-1].float()
    stock = float(logits.gather(1, sequences[0, 9:, None].to("cuda")).sum())
    total = float(gpu.components.sum() + gpu.residual.sum())
    bound = 1e-4 * (abs(stock) + 1) if dtype == torch.float32 else 6e-2 * (abs(stock) + 1)
    assert abs(total - stock) <= bound
    if dtype == torch.float32:
        assert torch.allclose(gpu.components.cpu(), cpu.components, atol=1e-4, rtol=1e-4)
    assert not llama_attrib.is_wrapped(model)


def test_every_entry_point_takes_cpu_ids_for_a_cuda_model() -> None:
    """ids made on the CPU (as the README's example makes them) for a model on the GPU:
    generate, the forward, decompose_sequence, decompose_answer and flow move them."""
    ids = prompt(9)  # on the CPU
    model = llama_attrib.wrap(tiny_model(2).to("cuda"))
    for mode in ("target", "forward"):
        out = model.generate(ids, decompose=mode, **GEN)
        assert out.sequences.device.type == "cuda"
        assert model(ids, decompose=mode)["attentions"].recovery.device.type == "cuda"
    mask = torch.ones_like(ids)
    steps = llama_attrib.decompose_sequence(model, ids, prompt_length=5, attention_mask=mask)
    answer = llama_attrib.decompose_answer(model, ids, prompt_length=5, attention_mask=mask)
    assert len(steps) == 4 and answer.components.shape == (8,)
    assert llama_attrib.flow(model, ids).scores.numel() > 0


def test_a_4bit_model_on_cuda_adds_up(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    path = tmp_path / "tiny"
    tiny_model(2).save_pretrained(path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cuda")
    ids = prompt(9)
    plain = model.generate(ids.to("cuda"), max_new_tokens=5, do_sample=False)
    out = llama_attrib.wrap(model).generate(ids, decompose=True, **GEN)
    assert torch.equal(out.sequences, plain)
    for c, scores in zip(out["attentions"], out.scores, strict=True):
        token = int(scores[0].argmax())
        parts = c[token]
        total = parts.components.sum() + parts.residual
        assert abs(float(total) - float(scores[0, token])) <= 6e-2 * float(scores[0].abs().max())


@pytest.mark.parametrize(("dtype", "asked"), [(torch.bfloat16, None), (torch.float32, "tf32")])
def test_tf32_products_stay_within_their_bound(dtype: torch.dtype, asked: str | None) -> None:
    """TF32 (the default for a half-precision model on CUDA, asked for a float32 one): the
    sums within the half-precision bound, the setting put back afterwards."""
    before = torch.get_float32_matmul_precision()
    model = llama_attrib.wrap(tiny_model(2, dtype=dtype).to("cuda"))
    out = model.generate(prompt(9), decompose=True, precision=asked, **GEN)
    assert torch.get_float32_matmul_precision() == before
    for c, scores in zip(out["attentions"], out.scores, strict=True):
        token = int(scores[0].argmax())
        total = c[token].components.sum() + c[token].residual
        assert abs(float(total) - float(scores[0, token])) <= 5e-2 * float(scores[0].abs().max())
