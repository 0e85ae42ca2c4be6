"""Quantized checkpoints (bitsandbytes 4-bit and 8-bit, torchao int8 weight-only), decomposed
through each layer's dequantized map, against the independent gradient x input on the stock
quantized model (conftest.gradient_x_input: bitsandbytes' own backward, which uses the
dequantized weight), and summing to the stock quantized model's own logits."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import llama_attrib
from conftest import gradient_x_input, prompt, quantizable_checkpoint
from llama_attrib import quantized

bnb = pytest.importorskip("bitsandbytes", reason="the quantization extra: pip install -e '.[quantization]'")
from transformers import BitsAndBytesConfig  # noqa: E402

# widths in blocks of 64 (bitsandbytes' 4-bit blocks; its CPU layout packs 32 rows at a time)
BASE = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
FAMILIES = {"llama": {}, "qwen2": {}, "gemma2": {"sliding_window": 4, "query_pre_attn_scalar": 32}}
GEN = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved float32 checkpoint of each family (quantized when loaded)."""
    out = {}
    for name, extra in FAMILIES.items():
        config = AutoConfig.for_model(name, **{**BASE, **extra})
        torch.manual_seed(len(name))
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # larger weights: attention far from uniform, gates and norms matter
            for p in model.parameters():
                p.mul_(4.0 if p.dim() > 1 else 1.0)
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out


def load(path: Path, how: str) -> nn.Module:
    """The checkpoint loaded as ``how`` says: "4bit" (NF4 through bitsandbytes' float32 path),
    "4bit-cpu-kernel" (NF4, bitsandbytes' CPU bfloat16 kernel where the CPU has one), "8bit"
    (LLM.int8) or "torchao" (int8 weight-only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "torchao":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager"
            )
            quantize_(model, Int8WeightOnlyConfig())
        else:
            config = (
                BitsAndBytesConfig(load_in_8bit=True)
                if how == "8bit"
                else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
            )
            model = AutoModelForCausalLM.from_pretrained(
                path, quantization_config=config, dtype=torch.float32, attn_implementation="eager"
            )
    if how == "4bit":
        # bitsandbytes runs 4-bit inference on an AVX512-BF16 CPU in a bfloat16 kernel; its
        # other path (CUDA's for a prompt, and the CPU's for a backward) is the float32 map
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model.eval()


def kinds(model: nn.Module) -> set[str | None]:
    return {quantized.kind(m) for m in model.modules() if isinstance(m, nn.Linear)}


def check_steps(model: nn.Module, out: Any, length: int, bound: float = 1e-5) -> list[float]:
    """Each step's components against the reference to ``bound`` of the logit, and components
    plus shares against the stock logit; returns each step's rounding share / logit."""
    rounding = []
    for step, c in enumerate(out["attentions"]):
        pred = int(c.recovery.argmax(-1))
        parts = c[pred]
        ref, no_token, logit = gradient_x_input(model, out.sequences[:, : length + step], pred)
        scale = float(c.recovery.abs().max())
        assert (parts.components.float() - ref).abs().max() <= bound * scale
        assert abs(float(parts.components.sum() + parts.residual) - logit) <= 1e-5 * scale
        # what belongs to no token: the reference's logit minus its components
        shares = {k: float(v) for k, v in parts.shares.items()}
        assert abs(shares["bias"] + shares["rounding"] - no_token) <= bound * scale
        rounding.append(shares["rounding"] / scale)
    return rounding


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("how", ["4bit", "torchao"])
@pytest.mark.parametrize("mode", ["target", "forward"])
def test_weight_only_quantized_models_decompose_exactly(
    checkpoints: dict[str, Path], family: str, how: str, mode: str
) -> None:
    if how == "torchao":
        pytest.importorskip("torchao")
    model = load(checkpoints[family], how)
    assert kinds(model) >= {quantized.BNB_4BIT if how == "4bit" else quantized.TORCHAO}
    ids = prompt(9)
    with torch.no_grad():
        plain = model.generate(ids, **GEN).sequences
    llama_attrib.wrap(model)
    out = model.generate(ids, decompose=mode, output_attentions=True, use_cache=True, **GEN)
    assert torch.equal(out.sequences, plain)
    llama_attrib.unwrap(model)
    rounding = check_steps(model, out, ids.shape[1])
    assert max(abs(r) for r in rounding) <= 1e-5  # the kernel is the dequantized map


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("how", ["4bit", "torchao"])
def test_rule_sets_on_quantized_layers_equal_the_dequantized_model(
    checkpoints: dict[str, Path], family: str, how: str
) -> None:
    """Under attnlrp, a weight-only quantized model's components and unassigned share equal
    those of the float model holding its dequantized weights (the rules see the dequantized
    maps: queries, keys and gates included), to 1e-5 of the logit."""
    if how == "torchao":
        pytest.importorskip("torchao")
    model = load(checkpoints[family], how)
    dense = AutoModelForCausalLM.from_pretrained(
        checkpoints[family], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    replaced = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if quantized.kind(m) is not None:
                dense.get_submodule(name).weight.copy_(quantized.dense(m).float())
                replaced += 1
    assert replaced >= 7 * 2  # every decoder linear map of both layers
    ids = prompt(9)
    got = llama_attrib.decompose_sequence(model, ids, 6, rules="attnlrp")
    want = llama_attrib.decompose_sequence(dense, ids, 6, rules="attnlrp")
    for c, d in zip(got, want, strict=True):
        token = int(d.recovery.argmax())
        scale = float(d.recovery.abs().max())
        assert torch.allclose(c[token].components, d[token].components, atol=1e-5 * scale, rtol=0)
        for share in ("bias", "unassigned"):
            assert abs(float(c[token].shares[share]) - float(d[token].shares[share])) <= 1e-5 * scale
        assert abs(float(d[token].shares["unassigned"])) > 1e-3 * scale  # the rule set is at work


def test_rule_sets_on_int8_layers_keep_the_rounding_share_apart(checkpoints: dict[str, Path]) -> None:
    """LLM.int8 under attnlrp: the run's own check holds (components and the three shares add
    up to the stock logit), and the int8 activations' rounding is its own share beside the
    rule set's unassigned one."""
    model = load(checkpoints["llama"], "8bit")
    ids = prompt(9)
    for c in llama_attrib.decompose_sequence(model, ids, 6, rules="attnlrp"):
        token = int(c.recovery.argmax())
        parts = c[token]
        scale = float(c.recovery.abs().max())
        total = float(parts.components.sum()) + sum(float(v) for v in parts.shares.values())
        assert abs(total - float(c.logits[token])) <= 3e-5 * scale
        assert abs(float(parts.shares["rounding"])) > 1e-7 and abs(float(parts.shares["unassigned"])) > 1e-3


def test_int8_rounds_the_activations_and_target_mode_reports_it(checkpoints: dict[str, Path]) -> None:
    model = load(checkpoints["qwen2"], "8bit")  # q/k/v biases too: both shares at once
    assert quantized.BNB_8BIT in kinds(model)
    ids = prompt(9)
    with torch.no_grad():
        plain = model.generate(ids, **GEN).sequences
        logits = model(ids).logits[0, -1]
    llama_attrib.wrap(model)
    out = model.generate(ids, decompose=True, output_attentions=True, use_cache=True, **GEN)
    assert torch.equal(out.sequences, plain)
    with pytest.raises(llama_attrib.UnsupportedOptionError, match=r"LLM\.int8.*target mode"):
        model.generate(ids, decompose="forward", output_attentions=True, **GEN)
    llama_attrib.unwrap(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits[0, -1], logits)  # left as it was, after the refusal
    rounding = check_steps(model, out, ids.shape[1])
    assert max(abs(r) for r in rounding) > 1e-5  # int8 activations: a share of its own


def test_int8_answer_and_sequence_carry_the_rounding_share(checkpoints: dict[str, Path]) -> None:
    model = llama_attrib.wrap(load(checkpoints["llama"], "8bit"))
    ids = prompt(10)
    with torch.no_grad():
        logits = model(ids, decompose=False).logits[0].float()
    answer = llama_attrib.decompose_answer(model, ids, prompt_length=6)
    targets = ids[0, 6:]
    total = float(logits[5:-1].gather(1, targets[:, None]).sum())
    assert abs(float(answer.components.sum() + answer.residual) - total) <= 1e-5 * float(logits.abs().max())
    assert abs(float(answer.shares["rounding"])) > 1e-6
    assert torch.equal(answer.residual, answer.shares["bias"] + answer.shares["rounding"])
    steps = llama_attrib.decompose_sequence(model, ids, prompt_length=6)
    summed = sum(float(c[int(t)].shares["rounding"]) for c, t in zip(steps, targets, strict=True))
    assert summed == pytest.approx(float(answer.shares["rounding"]), rel=1e-4, abs=1e-6)


def test_the_cpu_kernel_s_bfloat16_is_the_rounding_share(checkpoints: dict[str, Path]) -> None:
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes runs 4-bit layers in float32 here")
    model = load(checkpoints["llama"], "4bit-cpu-kernel")
    exact = load(checkpoints["llama"], "4bit")
    ids = prompt(9)
    with torch.no_grad():
        model(ids)  # the first inference call packs the weights for the CPU kernel
    assert all(quantized.rounds(m) for m in model.modules() if quantized.kind(m))
    llama_attrib.wrap(model)
    with pytest.raises(llama_attrib.UnsupportedOptionError, match=r"bfloat16.*target mode"):
        model(ids, decompose="forward")
    out = model.generate(ids, decompose=True, output_attentions=True, use_cache=True, **GEN)
    llama_attrib.unwrap(model)
    for step, c in enumerate(out["attentions"]):
        pred = int(c.recovery.argmax(-1))
        parts = c[pred]
        scale = float(c.recovery.abs().max())
        with torch.no_grad():
            logit = float(model(out.sequences[:, : ids.shape[1] + step]).logits[0, -1, pred])
        assert abs(float(parts.components.sum() + parts.residual) - logit) <= 1e-5 * scale
        assert abs(float(parts.shares["rounding"])) > 1e-6
        # the same weights through the float32 path: the components differ by the kernel's
        # bfloat16 rounding (measured 1.0e-3 to 1.1e-3 of the largest logit; bound at about twice)
        ref, _, _ = gradient_x_input(exact, out.sequences[:, : ids.shape[1] + step], pred)
        assert (parts.components.float() - ref).abs().max() <= 2.5e-3 * scale


def test_the_cpu_layout_unpacks_to_the_dequantized_weight() -> None:
    from bitsandbytes import functional

    weight = torch.randn(64, 128)
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    cpu, cpu_state = functional._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(state))
    found = quantized._unpack_cpu(cpu, cpu_state)
    # the layout keeps absmax in bfloat16: the weights its kernel computes with
    rounded = copy.deepcopy(state)
    rounded.absmax = state.absmax.to(torch.bfloat16).float()
    expected = functional.dequantize_4bit(packed, rounded)
    assert torch.allclose(found, expected, rtol=1e-6, atol=0)
    assert (found - weight).abs().max() <= 0.2 * weight.abs().max()  # NF4 of the weight


def test_each_layer_is_dequantized_once_per_pass_not_per_chunk(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = llama_attrib.wrap(load(checkpoints["llama"], "4bit"))
    calls: list[int] = []
    original = quantized._dequantize

    def counting(module: nn.Module) -> torch.Tensor:
        calls.append(id(module))
        return original(module)

    monkeypatch.setattr(quantized, "_dequantize", counting)
    monkeypatch.setattr(llama_attrib.rules.linear, "CHUNK_ELEMENTS", 64)  # many chunks per layer
    model(prompt(12), decompose="forward")
    # forward mode applies v, o, up and down to the components (q, k and the gate: the stock
    # layers on the real input), each once per layer however many chunks
    layers = len(model.model.layers)
    assert len(set(calls)) == 4 * layers
    assert len(calls) == 4 * layers


def test_attribute_keeps_the_rounding_share_apart(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from conftest import tiny_tokenizer

    model = load(checkpoints["llama"], "8bit")
    result = llama_attrib.attribute(model, tiny_tokenizer(), "the cat sat", max_new_tokens=3)
    scale = np.abs(result.logits).max()
    totals = np.nansum(result.token_scores, axis=1) + result.no_token
    assert np.allclose(totals, result.logits, atol=1e-5 * scale, rtol=0)
    assert result.rounding is not None and np.all(result.rounding != 0)
    # each named share is that step's own, not the sum of them (as "bias" was before)
    p = result.prompt_length
    steps = llama_attrib.decompose_sequence(model, torch.tensor([result.token_ids]), p)
    for k, c in enumerate(steps):
        shares = c[result.token_ids[p + k]].shares
        for name in ("bias", "rounding", "unassigned"):
            assert abs(float(shares[name]) - float(result.shares[name][k])) <= 1e-5 * scale, (name, k)
    again = type(result).load(result.save(tmp_path / "result.json"))
    assert np.array_equal(again.rounding, result.rounding)


def test_a_kernel_that_rounds_a_sequence_otherwise_than_generate_still_adds_up(tmp_path: Path) -> None:
    """bitsandbytes' bfloat16 CPU kernel rounds a whole sequence (the sweep's replay) otherwise
    than generate's one-token calls: the difference is bounded by the half-precision check and
    goes to the rounding share, so the parts add up to generate's own logits."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes runs 4-bit layers in float32 here")
    from transformers import LlamaForCausalLM

    quantizable_checkpoint(tmp_path, hidden=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, dtype=torch.float32
        )
    llama_attrib.wrap(model.eval())
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    gen = {**GEN, "max_new_tokens": 8, "output_scores": True}
    out = model.generate(ids, decompose=True, output_attentions=True, use_cache=True, **gen)
    for c, scores in zip(out["attentions"], out.scores, strict=True):
        token = int(scores[0].argmax())
        parts = c[token]
        total = float(parts.components.sum() + parts.shares["bias"] + parts.shares["rounding"])
        assert abs(total - float(scores[0, token])) <= 1e-5 * float(scores[0].abs().max())


def test_a_quantized_lm_head_is_refused_where_its_kernel_rounds(checkpoints: dict[str, Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["nothing"]
        )
        model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=config)
    head = model.get_output_embeddings()
    assert quantized.kind(head) == quantized.BNB_4BIT
    if not quantized.rounds(head):
        pytest.skip("this CPU runs bitsandbytes' 4-bit layers in float32: the head is a linear map")
    with pytest.raises(llama_attrib.UnsupportedModelError, match=r"LM head.*load it unquantized"):
        llama_attrib.wrap(model)
    assert not llama_attrib.is_wrapped(model)
