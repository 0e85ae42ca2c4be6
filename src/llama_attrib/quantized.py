"""Quantized linear layers: the dense map each one stands for, and whether its kernel rounds.

Weight-only quantization stores a weight in a few bits and a scale per block; the layer is the
linear map of the dequantized weight. The rules apply that map to the components (in their
dtype: the input is never cast to the storage dtype), so components stay exact. A kernel may
still compute something else than the dequantized map in float32: LLM.int8 (bitsandbytes
8-bit) rounds the activations to int8, and bitsandbytes' CPU 4-bit kernel computes in
bfloat16. Target mode reports that difference as its own share, ``rounding``
(:class:`~llama_attrib.passes.TargetPass`), so the parts still add up to the stock logit.

Supported: bitsandbytes ``Linear4bit`` (NF4, FP4, double quantization, the CPU's packed
layout), ``Linear8bitLt``, and torchao's weight-only tensors (anything with ``dequantize()``
behind a plain ``nn.Linear``). Dequantized weights are kept for the most recent layers
(:data:`KEPT`), so a pass dequantizes each once per layer, not once per chunk.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

BNB_4BIT = "bitsandbytes 4-bit"
BNB_8BIT = "bitsandbytes 8-bit (LLM.int8)"
TORCHAO = "torchao weight-only"

# Dequantized weights kept at once: a decoder layer's linear maps (7 for Llama) and a few more.
KEPT = 8
_dense: OrderedDict[int, tuple[int, Tensor]] = OrderedDict()


def kind(module: nn.Module) -> str | None:
    """Which supported quantization ``module`` is, or None (a plain layer, or not supported)."""
    name = type(module).__name__
    if type(module).__module__.startswith("bitsandbytes"):
        if name in ("Linear4bit", "LinearFP4", "LinearNF4"):
            return BNB_4BIT
        if name == "Linear8bitLt":
            return BNB_8BIT
        return None
    weight = getattr(module, "weight", None)
    subclass = isinstance(weight, Tensor) and type(weight) not in (Tensor, nn.Parameter)
    if type(module) is nn.Linear and subclass and type(weight).__module__.startswith("torchao"):
        return TORCHAO if callable(getattr(weight, "dequantize", None)) else None
    return None


def rounds(module: nn.Module) -> bool:
    """Whether the module's kernel computes something else than its dequantized map in the
    input's precision: LLM.int8 (activations rounded to int8), bitsandbytes' CPU 4-bit kernel
    (bfloat16, used for inference on CPUs with AVX512-BF16)."""
    found = kind(module)
    if found == BNB_8BIT:
        return True
    if found == BNB_4BIT:
        weight: Any = module.weight
        packed = getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False)
        kernel = bool(getattr(module, "support_avx512bf16_for_cpu", False))
        return bool(packed or (kernel and weight.device.type == "cpu" and not module.training))
    return False


def rounding_reason(module: nn.Module) -> str:
    """Why :func:`rounds` is true, in words."""
    if kind(module) == BNB_8BIT:
        return "LLM.int8 (bitsandbytes 8-bit) rounds the activations to int8"
    return "bitsandbytes' CPU 4-bit kernel (AVX512-BF16) computes in bfloat16"


def dense(module: nn.Module) -> Tensor:
    """The dequantized weight ``[out, in]`` of a quantized layer (detached; its storage's
    float dtype), computed once while it is among the :data:`KEPT` most recent."""
    weight: Any = module.weight
    key = id(module)
    stamp = _stamp(weight)
    found = _dense.get(key)
    if found is not None and found[0] == stamp:
        _dense.move_to_end(key)
        return found[1]
    value = _dequantize(module).detach()
    _dense[key] = (stamp, value)
    while len(_dense) > KEPT:
        _dense.popitem(last=False)
    return value


def forget() -> None:
    """Drop the kept dequantized weights (at the end of a decomposing call)."""
    _dense.clear()


def _stamp(weight: Tensor) -> int:
    """Changes when the stored weight does (reloaded, repacked or moved)."""
    data = getattr(weight, "data", weight)
    try:
        return hash((data.data_ptr(), data.shape, str(data.device), data._version))
    except (RuntimeError, AttributeError):  # a tensor subclass without storage of its own
        return hash((id(weight), weight.shape, str(weight.device)))


def _dequantize(module: nn.Module) -> Tensor:
    found = kind(module)
    weight: Any = module.weight
    if found == TORCHAO:
        value: Tensor = weight.dequantize()  # type: ignore[operator]
        return value
    if found == BNB_8BIT:
        scale = getattr(weight, "SCB", None)
        if scale is None:
            scale = getattr(getattr(module, "state", None), "SCB", None)
        if weight.dtype != torch.int8 or scale is None:
            raise ValueError(f"{type(module).__name__}: an 8-bit weight without its int8 data and row scales")
        rows: Tensor = weight.data.float() * (scale.float()[:, None] / 127.0)
        return rows
    if found == BNB_4BIT:
        state = weight.quant_state  # type: ignore[attr-defined]
        if getattr(state, "packing_format_for_cpu", False):
            return _unpack_cpu(weight.data, state)
        from bitsandbytes import functional

        dequantized: Tensor = functional.dequantize_4bit(weight.data, state)
        return dequantized
    raise ValueError(f"{type(module).__name__} is not a supported quantized layer")


def _unpack_cpu(packed: Tensor, state: object, block_n: int = 32) -> Tensor:
    """bitsandbytes' CPU layout (``_convert_weight_packed_for_cpu``: 4-bit codes interleaved in
    blocks of ``block_n`` rows, absmax ``[in / blocksize, out]`` in bfloat16) -> the weight,
    without touching the module's own tensors (bitsandbytes' inverse rewrites them)."""
    rows, half = packed.shape
    pairs = packed.reshape(-1, 32)
    codes = torch.cat([pairs & 0xF, (pairs >> 4) & 0xF], dim=-1)  # [-1, 64]
    codes = codes.reshape(rows // block_n, half, block_n, 2).transpose(1, 2).reshape(rows, 2 * half)
    table: Tensor = state.code.to(device=packed.device, dtype=torch.float32)  # type: ignore[attr-defined]
    blocksize = int(state.blocksize)  # type: ignore[attr-defined]
    absmax = state.absmax.to(torch.float32).T  # type: ignore[attr-defined]  # [out, in / blocksize]
    values = table[codes.long()]
    dense: Tensor = (values.reshape(rows, -1, blocksize) * absmax[:, :, None]).reshape(rows, 2 * half)
    return dense
