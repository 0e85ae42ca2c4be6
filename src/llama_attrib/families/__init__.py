"""Per-architecture maps: which module plays which role, and what a family refuses.

A family names its modules by role (embedding, norm, attention, mlp, lm_head) and the
exact stock classes it accepts. :func:`check` lists *every* problem before anything is
touched, so a refusal never leaves a half-patched model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import rules
from .._offload import offloading_hook
from ..errors import UnsupportedModelError, UnsupportedOptionError

NORM, ATTENTION, MLP, EMBEDDING, LM_HEAD = "norm", "attention", "mlp", "embedding", "lm_head"
SUPPORTED_ATTENTION = ("eager", "sdpa")
STANDARD_LAYER = {
    "input_layernorm": NORM,
    "self_attn": ATTENTION,
    "post_attention_layernorm": NORM,
    "mlp": MLP,
}


@dataclass(frozen=True)
class Family:
    """A declarative map of one architecture: which module plays which role, and how.

    ``classes``: role -> the stock class names accepted (anything else is refused);
    ``layer_roles``: decoder-layer attribute -> role, in the order the layer uses them;
    ``attention`` / ``mlp``: the rules' maps (which projection is the value, the gate...);
    ``norm_offset``: 1 for norms that scale by ``1 + weight``; ``inner``: classes allowed
    inside the attention and MLP besides ``nn.Linear`` (q/k norms, routers);
    ``checks``: what the family refuses beyond the common checks; ``notes``: what it needed.
    """

    name: str
    model_classes: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]
    layer_roles: dict[str, str] = field(default_factory=lambda: dict(STANDARD_LAYER))
    attention: rules.Attention = field(default_factory=rules.Attention)
    mlp: rules.GatedMLP | rules.SparseMoE = field(
        default_factory=lambda: rules.GatedMLP(
            rules.Proj("gate_proj"), rules.Proj("up_proj"), rules.Proj("down_proj")
        )
    )
    norm_offset: float = 0.0
    # role -> the decoder-layer norm applied to that block's output before the residual add
    # (OLMo 2 and Gemma's post-norms; Llama's ``post_attention_layernorm`` is a pre-norm)
    post_norms: dict[str, str] = field(default_factory=dict)
    inner: tuple[str, ...] = ()
    checks: Callable[[nn.Module], list[str]] | None = None
    notes: str = ""


def standard(prefix: str, **kwargs: Any) -> Family:
    """The Llama layout under another prefix (``Mistral`` -> MistralForCausalLM, MistralRMSNorm...)."""
    name = kwargs.pop("name", prefix.lower())
    classes: dict[str, tuple[str, ...]] = {
        NORM: (f"{prefix}RMSNorm",),
        ATTENTION: (f"{prefix}Attention",),
        MLP: (f"{prefix}MLP",),
        EMBEDDING: ("Embedding",),
    }
    classes.update(kwargs.pop("classes", {}))
    return Family(name=name, model_classes=(f"{prefix}ForCausalLM",), classes=classes, **kwargs)


FAMILIES: dict[str, Family] = {}
# A layer attribute's name in the other supported transformers version.
ALTERNATIVES = {"mlp": "block_sparse_moe"}


def register_family(family: Family) -> Family:
    """Make an architecture known, under each of its model classes (replacing any before)."""
    for cls in family.model_classes:
        FAMILIES[cls] = family
    return family


def family_of(model: nn.Module) -> Family:
    family = FAMILIES.get(type(model).__name__)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            [
                f"{type(model).__name__} is not a supported architecture (supported: {known}); "
                "see docs/families.md and llama_attrib.register_family"
            ]
        )
    return family


def roles(model: nn.Module, family: Family) -> Iterator[tuple[str, nn.Module]]:
    """Every module to patch, with its role: embedding, the layers' modules, norm, head."""
    base: Any = model.model
    yield EMBEDDING, base.embed_tokens
    for layer in base.layers:
        for attr, role in family.layer_roles.items():
            module = getattr(layer, attr, None)
            if module is None and attr in ALTERNATIVES:
                module = getattr(layer, ALTERNATIVES[attr], None)
            if module is None:
                raise UnsupportedModelError(
                    [f"{type(layer).__name__} has no {attr!r} ({family.name} family)"]
                )
            yield role, module
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
    problems = list(family.checks(model)) if family.checks else []
    names = {id(m): n for n, m in model.named_modules()}
    for role, module in roles(model, family):
        where = names.get(id(module), "?")
        expected = family.classes.get(role, ())
        if role != LM_HEAD and type(module).__name__ not in expected:
            problems.append(
                f"{where}: expected the stock {' or '.join(expected)}, found {type(module).__name__}"
            )
            continue
        inner = [("", module)] if role == LM_HEAD else []
        if role in (ATTENTION, MLP):
            inner = [(f".{n}", c) for n, c in module.named_children()]
        for suffix, sub in inner:
            has_weights = any(True for _ in sub.parameters())
            if type(sub) is nn.Linear or type(sub).__name__ in family.inner + family.classes.get(NORM, ()):
                continue
            if has_weights or "lora" in type(sub).__name__.lower() or isinstance(sub, nn.Linear):
                kind = f"{type(sub).__module__}.{type(sub).__qualname__}"
                problems.append(
                    f"{where}{suffix}: {kind} is not a plain torch.nn.Linear: merge adapters into the "
                    "weights first (PEFT/LoRA: model.merge_and_unload()), and load quantized "
                    "checkpoints unquantized (8-bit/4-bit layers are not exact linear maps of the "
                    "stored weights)"
                )
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


def final_softcap(model: nn.Module) -> float | None:
    """The final-logit soft-cap (Gemma): components sum to the logit before it."""
    value = getattr(model.config, "final_logit_softcapping", None)  # type: ignore[union-attr]
    return float(value) if value else None


def check_length(model: nn.Module, length: int) -> None:
    """Refuse sequences longer than the positions the model was built for."""
    limit = getattr(model.config, "max_position_embeddings", None)  # type: ignore[union-attr]
    if isinstance(limit, int) and length > limit:
        raise UnsupportedOptionError(
            f"the sequence would have {length} positions, more than the model's "
            f"max_position_embeddings ({limit}): shorten the prompt or max_new_tokens"
        )


def _load_builtin() -> None:
    from . import gemma, llama, mistral, mixtral, olmo2, phi3, qwen  # noqa: F401


_load_builtin()
