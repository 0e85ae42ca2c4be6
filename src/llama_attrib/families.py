"""Per-architecture maps: which module plays which role, and what a family refuses.

A family names its modules by role (embedding, norm, attention, mlp, lm_head) and the
exact stock classes it accepts. :func:`check` lists *every* problem before anything is
touched, so a refusal never leaves a half-patched model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._offload import offloading_hook
from .errors import UnsupportedModelError, UnsupportedOptionError

NORM, ATTENTION, MLP, EMBEDDING, LM_HEAD = "norm", "attention", "mlp", "embedding", "lm_head"
SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class Family:
    """A declarative map from roles to module classes and names, for one architecture."""

    name: str
    model_class: str
    classes: dict[str, str]  # role -> class name of the stock module
    layer_roles: dict[str, str]  # attribute of a decoder layer -> role
    layer_class: str
    projections: dict[str, tuple[str, ...]] = field(default_factory=dict)  # role -> linears


LLAMA = Family(
    name="llama",
    model_class="LlamaForCausalLM",
    classes={NORM: "LlamaRMSNorm", ATTENTION: "LlamaAttention", MLP: "LlamaMLP"},
    layer_roles={
        "input_layernorm": NORM,
        "self_attn": ATTENTION,
        "post_attention_layernorm": NORM,
        "mlp": MLP,
    },
    layer_class="LlamaDecoderLayer",
    projections={
        ATTENTION: ("q_proj", "k_proj", "v_proj", "o_proj"),
        MLP: ("gate_proj", "up_proj", "down_proj"),
    },
)

FAMILIES: dict[str, Family] = {LLAMA.model_class: LLAMA}


def register_family(family: Family) -> None:
    """Make another architecture known (its stock classes must follow the same rules)."""
    FAMILIES[family.model_class] = family


def family_of(model: nn.Module) -> Family:
    family = FAMILIES.get(type(model).__name__)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            [
                f"{type(model).__name__} is not a supported architecture (supported: {known}); "
                "see llama_attrib.families.register_family"
            ]
        )
    return family


def roles(model: nn.Module, family: Family) -> Iterator[tuple[str, nn.Module]]:
    """Every module to patch, with its role: embedding, the layers' leaves, norm, head."""
    base: Any = model.model
    yield EMBEDDING, base.embed_tokens
    for layer in base.layers:
        for attr, role in family.layer_roles.items():
            yield role, getattr(layer, attr)
    yield NORM, base.norm
    yield LM_HEAD, model.get_submodule("lm_head")


def check(model: nn.Module) -> Family:
    """The model's family, or UnsupportedModelError listing every problem found."""
    family = family_of(model)
    problems = _config_problems(model) + _module_problems(model, family)
    if problems:
        raise UnsupportedModelError(problems)
    return family


def _config_problems(model: nn.Module) -> list[str]:
    config = model.config  # type: ignore[union-attr]
    problems = []
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        problems.append(
            f"attention implementation {impl!r}: load the model with "
            f"attn_implementation='sdpa' or 'eager' (the numbers do not depend on which)"
        )
    if model.training:
        problems.append("the model is in training mode: call model.eval() first")
    checkpointing = getattr(type(model), "is_activation_checkpointing", None)
    checkpointing = "is_activation_checkpointing" if checkpointing else "is_gradient_checkpointing"
    if getattr(model, checkpointing, False):
        problems.append("gradient checkpointing is on: call model.gradient_checkpointing_disable()")
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        problems.append("pretraining_tp > 1 is not supported: set config.pretraining_tp = 1")
    return problems


def _module_problems(model: nn.Module, family: Family) -> list[str]:
    problems = []
    names = {id(m): n for n, m in model.named_modules()}
    for role, module in roles(model, family):
        where = names.get(id(module), "?")
        expected = family.classes.get(role)
        if expected is not None and type(module).__name__ != expected:
            problems.append(f"{where}: expected the stock {expected}, found {type(module).__name__}")
            continue
        linears = family.projections.get(role, ())
        if role == LM_HEAD:
            linears = ("",)
        for attr in linears:
            sub = getattr(module, attr) if attr else module
            label = f"{where}.{attr}" if attr else where
            if type(sub) is not nn.Linear:
                kind = f"{type(sub).__module__}.{type(sub).__qualname__}"
                problems.append(
                    f"{label}: {kind} is not a plain torch.nn.Linear: merge adapters into the "
                    "weights first (PEFT/LoRA: model.merge_and_unload()), and load quantized "
                    "checkpoints unquantized (8-bit/4-bit layers are not exact linear maps of the "
                    "stored weights)"
                )
            elif sub.bias is not None:
                problems.append(f"{label}: has a bias, which belongs to no input token")
        if role == EMBEDDING and type(module) is not nn.Embedding:
            problems.append(f"{where}: {type(module).__name__} is not a plain torch.nn.Embedding")
    for name, param in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if param.device.type == "meta" and offloading_hook(owner) is None:
            problems.append(
                f"{name}: weights on the meta device that no accelerate offload hook loads "
                "(load the checkpoint, or dispatch it with accelerate's device_map / cpu_offload)"
            )
            break
        if not param.dtype.is_floating_point:
            problems.append(f"{name}: dtype {param.dtype} (quantized weights are not supported)")
            break
    return problems


def component_dtype(model: nn.Module) -> torch.dtype:
    """Components accumulate in float32 when the model runs in half precision."""
    dtype = next(model.parameters()).dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_length(model: nn.Module, length: int) -> None:
    """Refuse sequences longer than the positions the model was built for."""
    limit = getattr(model.config, "max_position_embeddings", None)  # type: ignore[union-attr]
    if isinstance(limit, int) and length > limit:
        raise UnsupportedOptionError(
            f"the sequence would have {length} positions, more than the model's "
            f"max_position_embeddings ({limit}): shorten the prompt or max_new_tokens"
        )
