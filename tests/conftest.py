"""Shared fixtures: tiny random Llama models built here, the reference checkpoint, SmolLM2."""

from __future__ import annotations

import json
import os
import re
import types
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"  # see its README.md
REFERENCE = Path(os.environ.get("LLAMA_ATTRIB_REFERENCE", REFERENCE))

ROPE_SCALINGS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "longrope": {
        "rope_type": "longrope",
        "factor": 2.0,
        "short_factor": [1.0] * 4,
        "long_factor": [1.5] * 4,
        "original_max_position_embeddings": 32,
    },
}


# Every tiny configuration the tests use, for scripts/measure_guards.py.
CONFIGS_FOR_GUARDS = [
    (4, "default", False, "eager"),
    (2, "default", True, "sdpa"),
    (1, "default", False, "sdpa"),
    *[(2, rope, rope == "yarn", "sdpa") for rope in ROPE_SCALINGS if rope != "default"],
]


def tiny_config(
    kv_heads: int = 2, rope: str = "default", tied: bool = False, attn: str = "sdpa", layers: int = 2
) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rope_scaling=ROPE_SCALINGS[rope],
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = attn
    return config


@cache
def _tiny_state(kv_heads: int, rope: str, tied: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(1234 + kv_heads + len(rope) + tied)
    model = LlamaForCausalLM(tiny_config(kv_heads, rope, tied))
    # Larger-than-default weights so that attention is not uniform and the MLP matters.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def tiny_model(
    kv_heads: int = 2,
    rope: str = "default",
    tied: bool = False,
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A fresh tiny random Llama (same weights for the same shape, whatever ``attn``)."""
    model = LlamaForCausalLM(tiny_config(kv_heads, rope, tied, attn))
    model.load_state_dict(_tiny_state(kv_heads, rope, tied), strict=False)
    if tied:
        model.tie_weights()
    return model.to(dtype).eval()


def quantizable_checkpoint(path: Path, hidden: int = 64) -> Path:
    """A random Llama saved to ``path`` (with the tiny tokenizer) in widths bitsandbytes
    quantizes: blocks of 64, and 32 rows at a time in its CPU layout."""
    config = LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def prompt(length: int = 7, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=g)
    ids[:, 0] = 1
    return ids


def reference_case(name: str = "tiny_mha") -> tuple[Path, dict[str, Any]]:
    folder = REFERENCE / name
    if not folder.is_dir():
        pytest.fail(f"reference folder {folder} is missing (set LLAMA_ATTRIB_REFERENCE)")
    return folder, json.loads((folder / "reference.json").read_text())


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    from llama_attrib.models import load

    return load()


CORPUS = [
    "the capital of france is paris.",
    "the cat sat on the mat, and the dog sat on the rug.",
    "user\nwhat is the capital of france?\nassistant\nparis is the capital.",
    "system\nyou answer in one word.\n",
    "a cat and a dog are animals; paris and rome are cities.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@cache
def _tiny_tokenizer_json(kind: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "bytelevel":  # GPT-2 / Llama 3 / SmolLM2 style: 'Ġ' pieces, decode keeps the space
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:  # SentencePiece style: '▁' pieces, decoding one token drops its leading space
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=96, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return str(tok.to_str())


def tiny_tokenizer(kind: str = "bytelevel") -> Any:
    """A tokenizer trained here on a few sentences (vocabulary <= 96, ids 0-2 = pad, BOS, EOS,
    as in the tiny models), with a small chat template: ``bytelevel`` or ``sentencepiece``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(kind)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# modules whose output is a frozen factor's input or the factor itself: q/k, activations, routers
DETACHED = ("q_proj", "k_proj", "act_fn", "activation_fn", "mlp.gate", "block_sparse_moe.gate")
DETACHED += ("shared_expert_gate", "mlp.router")  # Qwen2-MoE's shared expert's gate, GPT-OSS's router
DETACHED += ("block_sparse_moe.router", "shared_mlp.activation", "block_sparse_moe.activation")  # Granite 4.0


def _detach_output(module: nn.Module, args: Any, out: Any) -> Any:
    if isinstance(out, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
    return out.detach()


def _frozen_norm(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    # The norm's factor is out / x; where x is exactly 0 (a quantized checkpoint's embeddings
    # have such entries) it is read from the module run on 1e-20 there (no hooks), which
    # changes the norm's scale by nothing measurable.
    x = args[0]
    safe = torch.where(x == 0, torch.full_like(x, 1e-20), x).detach()
    with torch.no_grad():
        ratio = type(module).forward(module, safe).to(out.dtype) / safe.to(out.dtype)
    return x.to(out.dtype) * ratio


def _frozen_layer_norm(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    # LayerNorm's centring kept, its scale (out - bias) / (x - mean) frozen, its bias added
    x = args[0]
    centred = x - x.mean(-1, keepdim=True)
    bias = 0.0 if module.bias is None else module.bias.detach()
    safe = torch.where(centred == 0, torch.full_like(centred, 1e-20), centred).detach()
    return centred * ((out - bias) / safe).detach() + bias


def _frozen_ratio(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    # an activation without a gate: act(z) = z * (act(z) / z), the ratio frozen
    x = args[0]
    safe = torch.where(x == 0, torch.full_like(x, 1e-20), x).detach()
    return x * (out / safe).detach()


def _detach_queries_and_keys(heads: int, per_head: int, interleaved: bool) -> Any:
    """A fused qkv projection's hook: the query and key outputs detached, the values live.
    ``interleaved``: per head, its query, key and value (GPT-NeoX); else all queries, then all
    keys, then all values (GPT-2, Phi-3)."""

    def hook(m: nn.Module, a: Any, out: torch.Tensor) -> torch.Tensor:
        if interleaved:
            view = out.view(*out.shape[:-1], heads, 3 * per_head)
            live = view[..., 2 * per_head :]
            return torch.cat([view[..., : 2 * per_head].detach(), live], -1).view(out.shape)
        n = out.shape[-1] - heads * per_head
        return torch.cat([out[..., :n].detach(), out[..., n:]], -1)

    return hook


@contextmanager
def _head_outputs(model: nn.Module, handles: list[Any]) -> Iterator[list[torch.Tensor]]:
    """The LM head's outputs, appended as it runs; ``handles`` (hooks) removed at the end."""
    head_out: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    handles.append(head.register_forward_hook(lambda m, a, out: head_out.append(out)))
    try:
        yield head_out
    finally:
        for h in handles:
            h.remove()


def _gate_columns(gate_up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's fused gate/up output with its gate columns (the even ones) detached."""
    gate = torch.zeros(gate_up.shape[-1], dtype=torch.bool, device=gate_up.device)
    gate[::2] = True
    return torch.where(gate, gate_up.detach(), gate_up)


def _stock_gate_4x(self: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS 4.57's inline gate arithmetic (5.x's ``_apply_gate``), as its CPU loop has it."""
    gate = gate_up[..., ::2].clamp(min=None, max=self.limit)
    up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def _experts_4x(
    self: nn.Module, hidden: torch.Tensor, router_indices: Any = None, routing_weights: Any = None
) -> Any:
    """GPT-OSS's 4.57 experts: its CPU loop, the gate arithmetic through the instance's
    ``_apply_gate`` (which a reference hook sets; the stock one by default). Checked equal to
    the stock loop by tests/test_gpt_oss.py."""
    shape = hidden.shape
    flat = hidden.reshape(-1, shape[-1])
    out = torch.zeros_like(flat)
    apply_gate = getattr(self, "_apply_gate", None) or (lambda gate_up: _stock_gate_4x(self, gate_up))
    for e in torch.unique(router_indices).tolist():
        rows = (router_indices == e).any(-1).nonzero()[:, 0]
        gate_up = flat[rows] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        y = apply_gate(gate_up) @ self.down_proj[e] + self.down_proj_bias[e]
        out = out.index_add(0, rows, y * routing_weights[rows, e, None])
    return out.view(shape)


def _credited_gate(own: Any) -> Any:
    """GPT-OSS's ``(clamp(u) + 1) * glu(min(g, L))`` by the uniform rule, from the stock gate
    arithmetic ``own``: half the gradient through ``u`` (the gate's columns detached), half
    through the gate by the identity rule on its whole chain (``glu = g * (glu / g)``, the
    ratio and ``clamp(u) + 1`` detached); the result's gradient halved again (the expert's
    half of its output x its routing weight)."""

    def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(gate_up.shape[-1], device=gate_up.device)
        through_up = own(_gate_columns(gate_up))
        glu = own(torch.where(columns % 2 == 1, torch.zeros_like(gate_up), gate_up)).detach()  # up = 0
        g = gate_up[..., ::2]
        safe = torch.where(g == 0, torch.full_like(g, 1e-20), g).detach()
        other = (through_up / torch.where(glu == 0, torch.ones_like(glu), glu)).detach()  # clamp(u) + 1
        through_gate = other * g * (glu / safe)
        return _half(0.5 * through_up + 0.5 * through_gate)

    return apply_gate


def _gpt_oss_experts(module: nn.Module, credited: bool) -> Any:
    """GPT-OSS's experts with the gate's side detached (clamps and all; up stays live), or by
    the uniform rule (:func:`_credited_gate`): 5.x's own ``_apply_gate`` wrapped, 4.x's loop
    by :func:`_experts_4x`. Returns the handle that puts the module back."""
    handles = []
    if not hasattr(module, "_apply_gate"):  # 4.57: the loop, with the arithmetic as it has it
        module.forward = types.MethodType(_experts_4x, module)
        handles.append(_Restore(module))
        own = lambda gate_up: _stock_gate_4x(module, gate_up)  # noqa: E731
    else:
        own = module._apply_gate
    module._apply_gate = _credited_gate(own) if credited else (lambda gate_up: own(_gate_columns(gate_up)))
    handles.append(_Restore(module, "_apply_gate"))
    return _Handles(handles)


class _Handles:
    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in reversed(self.handles):
            h.remove()


def _latent_keys_detached(config: Any, name: str) -> Any:
    """A latent attention's projection with its key columns detached, its value path live:
    ``kv_a_proj_with_mqa``'s rotary-key columns (after the latent's), ``kv_b_proj``'s per-head
    key columns (each head's ``qk_nope_head_dim`` before its values)."""

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(out.shape[-1], device=out.device)
        if name.endswith("kv_a_proj_with_mqa"):
            key = columns >= config.kv_lora_rank
        else:
            key = columns % (config.qk_nope_head_dim + config.v_head_dim) < config.qk_nope_head_dim
        return torch.where(key, out.detach(), out)

    return hook


def _frozen_gated_norm(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    # a gated norm norm(y * silu(z)): its whole factor out / y frozen (z reaches nothing else)
    y = args[0]
    safe = torch.where(y == 0, torch.full_like(y, 1e-20), y).detach()
    return y.to(out.dtype) * (out / safe).detach()


def _credited_gated_norm(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    # a gated norm norm(y * silu(z)) by the uniform rule: half through y (the rest frozen), half
    # through z by the identity rule (y frozen)
    y, z = args[0], args[1]
    safe_y = torch.where(y == 0, torch.full_like(y, 1e-20), y).detach()
    safe_z = torch.where(z == 0, torch.full_like(z, 1e-20), z).detach()
    return 0.5 * y.to(out.dtype) * (out / safe_y).detach() + 0.5 * z.to(out.dtype) * (out / safe_z).detach()


def _mamba_act(x_channels: int) -> Any:
    """A forward hook on a Mamba-2 layer's activation (4.x calls the module on the convolution's
    output, channels last): the ``x`` channels by the identity rule, ``B`` and ``C`` detached."""

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        u = args[0][..., :x_channels]
        safe = torch.where(u == 0, torch.full_like(u, 1e-20), u).detach()
        return torch.cat([u * (out[..., :x_channels] / safe).detach(), out[..., x_channels:].detach()], -1)

    return hook


def _detach_last(columns: int) -> Any:
    """A forward hook detaching the output's last ``columns`` (a Mamba-2 ``in_proj``'s dt)."""

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(out.shape[-1], device=out.device) < out.shape[-1] - columns
        return torch.where(keep, out, out.detach())

    return hook


class _Frozen_Mamba:
    """The Mamba-2 layers' selection frozen (a handle). 5.x: the modeling module's convolution
    function with the activation on the ``x`` channels by the identity rule (its ratio
    detached) and ``B``, ``C`` detached, its chunked scan given ``dt`` detached. 4.x (the
    convolution and scan inline): hooks on each layer's activation (:func:`_mamba_act`) and
    on its ``in_proj``'s ``dt`` columns. Put back by :meth:`remove`."""

    def __init__(self, layer: nn.Module, model: nn.Module) -> None:
        import importlib

        from transformers.activations import ACT2FN

        self.module = importlib.import_module(type(layer).__module__)
        self.hooks: list[Any] = []
        x_channels = int(layer.intermediate_size)
        if getattr(self.module, "mamba2_chunk_scan", None) is None:  # 4.x
            self.own = None
            for m in (x for x in model.modules() if type(x).__name__ == type(layer).__name__):
                self.hooks.append(m.act.register_forward_hook(_mamba_act(x_channels)))
                self.hooks.append(m.in_proj.register_forward_hook(_detach_last(int(m.num_heads))))
            return
        self.own = (self.module.causal_conv1d_fn, self.module.mamba2_chunk_scan)
        act = ACT2FN[layer.activation]
        conv_own, scan_own = self.own

        def conv(
            hidden: torch.Tensor, weight: Any, bias: Any = None, activation: Any = None, **kw: Any
        ) -> Any:
            u = conv_own(hidden, weight, bias, activation=None, **kw)  # [B, channels, T]
            y = act(u)
            x = u[:, :x_channels]
            safe = torch.where(x == 0, torch.full_like(x, 1e-20), x).detach()
            return torch.cat([x * (y[:, :x_channels] / safe).detach(), y[:, x_channels:].detach()], 1)

        def scan(hidden: torch.Tensor, dt: torch.Tensor, *args: Any, **kw: Any) -> Any:
            return scan_own(hidden, dt.detach(), *args, **kw)

        self.module.causal_conv1d_fn, self.module.mamba2_chunk_scan = conv, scan

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        if self.own is not None:
            self.module.causal_conv1d_fn, self.module.mamba2_chunk_scan = self.own


@contextmanager
def frozen_factors(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Forward hooks on the stock model that know no formula: RMSNorm outputs become
    ``x * (out / x).detach()`` and LayerNorm outputs ``c * ((out - b) / c).detach() + b``
    (``c`` the centred input, ``b`` the bias); a gate-less MLP activation's output becomes
    ``z * (act(z) / z).detach()``; the q and k projections' outputs (a fused projection's
    q/k rows), a gated MLP activation's output and the router's output are detached. Yields
    the list the LM head's outputs are appended to."""
    handles = []
    config = model.config
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") and not name.endswith(("q_norm", "k_norm")):
            handles.append(module.register_forward_hook(_frozen_norm))
        elif kind == "LayerNorm":
            handles.append(module.register_forward_hook(_frozen_layer_norm))
        elif name.endswith("mlp.act"):  # GPT-2 and GPT-NeoX name a gate-less activation so
            handles.append(module.register_forward_hook(_frozen_ratio))
        elif name.endswith(("query_key_value", "attn.c_attn")):
            heads = config.num_attention_heads
            hook = _detach_queries_and_keys(heads, config.hidden_size // heads, name.endswith("key_value"))
            handles.append(module.register_forward_hook(hook))
        elif name.endswith(DETACHED):
            handles.append(module.register_forward_hook(_detach_output))
        elif name.endswith("qkv_proj"):  # Phi-3: queries, keys, then values of the kv heads
            kv = config.num_key_value_heads
            handles.append(module.register_forward_hook(_detach_queries_and_keys(kv, config.head_dim, False)))
        elif kind == "GptOssExperts":
            handles.append(_gpt_oss_experts(module, credited=False))
        elif kind.endswith("RMSNormGated"):
            handles.append(module.register_forward_hook(_frozen_gated_norm))
        elif kind.endswith("MambaLayer") and not any(isinstance(h, _Frozen_Mamba) for h in handles):
            handles.append(_Frozen_Mamba(module, model))
        elif name.endswith(("q_a_proj", "q_b_proj")):  # a latent attention's queries
            handles.append(module.register_forward_hook(_detach_output))
        elif name.endswith(("kv_a_proj_with_mqa", "kv_b_proj")):  # its keys' columns
            handles.append(module.register_forward_hook(_latent_keys_detached(config, name)))
    with _head_outputs(model, handles) as head_out:
        yield head_out


def _scaled_gradient(factor: float, rows: Any = None) -> Any:
    """A forward hook: the output unchanged, its gradient times ``factor`` (on the output
    rows ``rows(out)`` only, a boolean mask of the last dimension, if given)."""

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        scaled = out * factor + (out * (1 - factor)).detach()
        if rows is None:
            return scaled
        return torch.where(rows(out).to(out.device), scaled, out)

    return hook


def _identity_half(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    # a gated MLP's activation: the identity rule (act(z) = z * (act(z) / z), the ratio frozen),
    # then half the gradient (the uniform rule on gate x up)
    live = _frozen_ratio(module, args, out)
    return live * 0.5 + (live * 0.5).detach()


def _fused_rows(config: Any, name: str) -> tuple[Any, Any]:
    """Masks of a fused projection's query-or-key rows and value rows (GPT-2's c_attn, GPT-NeoX's
    per-head interleaved query_key_value, Phi-3's qkv_proj)."""
    heads = config.num_attention_heads
    if name.endswith("qkv_proj"):
        hd, kv = config.head_dim, config.num_key_value_heads
        n = heads * hd + kv * hd
        return (lambda o: torch.arange(o.shape[-1]) < n), (lambda o: torch.arange(o.shape[-1]) >= n)
    per_head = config.hidden_size // heads
    if name.endswith("key_value"):  # per head: its query, key and value
        value = lambda o: (torch.arange(o.shape[-1]) % (3 * per_head)) >= 2 * per_head  # noqa: E731
    else:
        value = lambda o: torch.arange(o.shape[-1]) >= 2 * config.hidden_size  # noqa: E731
    return (lambda o: ~value(o)), value


def _half(t: torch.Tensor) -> torch.Tensor:
    """``t`` unchanged, its gradient halved (the uniform rule's share of a product's side)."""
    return t * 0.5 + (t * 0.5).detach()


def _half_router(module: nn.Module, args: Any, out: Any) -> Any:
    # the router's half of (routing weight x expert output): 4.x's nn.Linear gives the logits,
    # 5.x's router module (logits, weights, experts), 4.x's GPT-OSS (weights, experts) and
    # DeepSeek-V3 (experts, weights); the softmax is differentiated as it is
    if isinstance(out, tuple) and len(out) == 3:
        return (out[0], _half(out[1]), *out[2:])
    if isinstance(out, tuple):
        return tuple(_half(o) if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
    return _half(out)


def _credited_experts(self: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: Any) -> Any:
    """transformers 5.x's fused experts, with the uniform rule on each expert's act(gate) x up
    (the activation's hook gives the gate's side its identity rule and half) and on each
    expert's output x its routing weight (the router's hook halves the weight's side)."""
    out = torch.zeros_like(hidden)
    for e in range(int(self.gate_up_proj.shape[0])):
        positions, slot = torch.where(index == e)
        if positions.numel() == 0:
            continue
        gate, up = F.linear(hidden[positions], self.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(self.act_fn(gate) * _half(up), self.down_proj[e])
        out = out.index_add(0, positions, _half(y) * weights[positions, slot, None])
    return out


def _latent_columns(config: Any) -> tuple[Any, Any]:
    """Masks of ``kv_b_proj``'s key columns and value columns (per head: keys, then values)."""
    width, nope = config.qk_nope_head_dim + config.v_head_dim, config.qk_nope_head_dim
    return (lambda o: torch.arange(o.shape[-1]) % width < nope), (
        lambda o: torch.arange(o.shape[-1]) % width >= nope
    )


@contextmanager
def credited_factors(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The AttnLRP paper's rules as forward hooks on the stock model (eager attention), in the
    gradient x input form, knowing no formula of the library: every norm's scale frozen (q/k
    norms too); the q and k projections' gradients times 1/4 and v's times 1/2 (the maps
    between them and the attention are linear, so this is the uniform rule on q k^T and on
    probabilities x values, the softmax differentiated as it is); a gated MLP's activation by
    the identity rule and the products' two sides at half their gradient; a gate-less
    activation by the identity rule. Yields the list the LM head's outputs are appended to."""
    handles = []
    config = model.config
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm"):
            handles.append(module.register_forward_hook(_frozen_norm))
        elif kind == "LayerNorm":
            handles.append(module.register_forward_hook(_frozen_layer_norm))
        elif name.endswith("mlp.act"):
            handles.append(module.register_forward_hook(_frozen_ratio))
        elif name.endswith(("query_key_value", "attn.c_attn", "qkv_proj")):
            qk, v = _fused_rows(config, name)
            handles.append(module.register_forward_hook(_scaled_gradient(0.25, qk)))
            handles.append(module.register_forward_hook(_scaled_gradient(0.5, v)))
        elif name.endswith(("q_proj", "k_proj", "q_b_proj")):
            handles.append(module.register_forward_hook(_scaled_gradient(0.25)))
        elif name.endswith("kv_a_proj_with_mqa"):  # a latent attention's rotary key columns
            rotary = lambda o: torch.arange(o.shape[-1]) >= config.kv_lora_rank  # noqa: E731
            handles.append(module.register_forward_hook(_scaled_gradient(0.25, rotary)))
        elif name.endswith("kv_b_proj"):  # per head its key columns, then its value columns
            key, value = _latent_columns(config)
            handles.append(module.register_forward_hook(_scaled_gradient(0.25, key)))
            handles.append(module.register_forward_hook(_scaled_gradient(0.5, value)))
        elif name.endswith("v_proj"):
            handles.append(module.register_forward_hook(_scaled_gradient(0.5)))
        elif name.endswith(
            ("act_fn", "activation_fn", "shared_mlp.activation", "block_sparse_moe.activation")
        ):
            handles.append(module.register_forward_hook(_identity_half))
        elif name.endswith(("gate_up_proj", "input_linear")):  # Phi-3, Granite 4's shared MLP: gate, then up
            up = lambda o: torch.arange(o.shape[-1]) >= o.shape[-1] // 2  # noqa: E731
            handles.append(module.register_forward_hook(_scaled_gradient(0.5, up)))
        elif name.endswith(("up_proj", ".w3")):  # Mixtral 4.x's experts call up w3
            handles.append(module.register_forward_hook(_scaled_gradient(0.5)))
        elif name.endswith((".gate", ".router", "shared_expert_gate")):  # a router, a shared expert's gate
            handles.append(module.register_forward_hook(_half_router))
        elif name.endswith(("shared_expert", "block_sparse_moe.output_linear")) or re.search(
            r"experts\.\d+$", name
        ):
            # an expert's output (Granite 4.0 in 4.x: every expert's, before its routing weight)
            handles.append(module.register_forward_hook(_scaled_gradient(0.5)))
        elif kind == "GptOssExperts":
            handles.append(_gpt_oss_experts(module, credited=True))
        elif kind.endswith("RMSNormGated"):
            handles.append(module.register_forward_hook(_credited_gated_norm))
        elif kind.endswith("MambaLayer") and not any(isinstance(h, _Frozen_Mamba) for h in handles):
            handles.append(_Frozen_Mamba(module, model))
        elif kind.endswith("Experts") and hasattr(module, "gate_up_proj"):  # 5.x's fused experts
            module.forward = types.MethodType(_credited_experts, module)
            handles.append(_Restore(module))
    with _head_outputs(model, handles) as head_out:
        yield head_out


class _Restore:
    """A handle that removes an instance's own method (the class's is used again)."""

    def __init__(self, module: nn.Module, name: str = "forward") -> None:
        self.module, self.name = module, name

    def remove(self) -> None:
        delattr(self.module, self.name)


def gradient_x_input(
    model: nn.Module,
    ids: torch.Tensor,
    token: int,
    row: int = 0,
    position: int = -1,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    objective: Any = None,
    factors: Any = None,
) -> tuple[torch.Tensor, float, float]:
    """The independent reference: ``(components [T], bias share, logit)`` of ``token``'s logit
    (before any final soft-cap) at ``position`` of batch row ``row``, on the stock (unwrapped)
    model, in float32 arithmetic of the model's own dtype.

    Gradient x input of the logit with the frozen factors detached by forward hooks that know
    no formula: norm outputs become ``x * (out / x).detach()``; the q and k projections'
    outputs (Phi-3: the fused q/k rows), the MLP activation's output and the router's output
    are detached (a shared expert's sigmoid gate too). With q and k detached the attention
    probabilities are constants; everything
    else stays live. Gradient x input over the input embeddings gives each token's component;
    the logit minus their sum is what belongs to no token (the biases' share).
    """
    positions: list[torch.Tensor] = []  # learned position embeddings (GPT-2), as leaves

    def position_leaf(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        positions.append(out.detach().requires_grad_(True))
        return positions[-1]

    learned = [m for n, m in model.named_modules() if n.endswith(".wpe")]
    with (factors or frozen_factors)(model) as head_out:
        handles = [m.register_forward_hook(position_leaf) for m in learned]
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        try:
            out = model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        finally:
            for h in handles:
                h.remove()
        # the logit as the model returns it; with a final soft-cap, the LM head's output before it
        capped = getattr(model.config, "final_logit_softcapping", None)
        logits = head_out[-1] if capped else out.logits
        # ``objective``: what is explained instead of ``token``'s logit, from the logits row
        row_logits = logits[row, position].float()
        logit = row_logits[token] if objective is None else objective(row_logits)
        grads = torch.autograd.grad(logit, [embeds, *positions])
    components = (grads[0].float() * embeds.float()).sum(-1)[row].detach()
    for leaf, grad in zip(positions, grads[1:], strict=True):  # a position's embedding is its token's
        per_position = (grad.float() * leaf.float()).sum(-1)
        components = components + per_position[min(row, per_position.shape[0] - 1)].detach()
    value = float(logit.detach())
    return components, value - float(components.sum()), value


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model and its tokenizer saved as a checkpoint folder (for what loads from disk)."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``make test`` runs the suite once per transformers version; the second run sets
    ``LLAMA_ATTRIB_SECOND_RUN=1`` and leaves out the tests marked ``once`` (docs, views, files,
    the CLI: nothing in them depends on the version)."""
    if not os.environ.get("LLAMA_ATTRIB_SECOND_RUN"):
        return
    once = [item for item in items if item.get_closest_marker("once")]
    if once:
        config.hook.pytest_deselected(items=once)
        items[:] = [item for item in items if not item.get_closest_marker("once")]
