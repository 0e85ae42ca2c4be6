"""Per-architecture maps: where a model's modules are, which role each plays, and what a
family refuses.

A family owns its model's topology (:class:`Topology`: the paths to the base model, its
layers, embedding, final norm and LM head) and names the modules of a decoder layer by
role (embedding, norm, attention, mlp, lm_head), with the exact stock classes it accepts and
the rule each gets. Nothing outside this package names a module of the model: the engines
ask the family (:meth:`Family.layers`, :meth:`Family.block`, :meth:`Family.head_weight`...).
:func:`check` lists *every* problem before anything is touched, so a refusal never leaves a
half-patched model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .. import _compat, _offload, quantized, rules
from .._offload import offloading_hook
from ..errors import UnsupportedModelError, UnsupportedOptionError
from .placement import (
    check_length,
    component_dtype,
    input_device,
    model_dtype,
    refuse_images,
    text_config,
    to_input_device,
)

__all__ = [
    "check_length",
    "component_dtype",
    "input_device",
    "model_dtype",
    "refuse_images",
    "text_config",
    "to_input_device",
]

NORM, ATTENTION, MLP, EMBEDDING, LM_HEAD = "norm", "attention", "mlp", "embedding", "lm_head"
MIXER = "mixer"  # a state-space layer in attention's place (Mamba-2: rules.mamba)
SUPPORTED_ATTENTION = ("eager", "sdpa")
STANDARD_LAYER = {
    "input_layernorm": NORM,
    "self_attn": ATTENTION,
    "post_attention_layernorm": NORM,
    "mlp": MLP,
}


# Llama's module names, which most families share (a family with other names gives its rules)
LLAMA_ATTENTION = rules.Attention(rules.Proj("v_proj"), rules.Proj("o_proj"))
SWIGLU = rules.GatedMLP(rules.Proj("gate_proj"), rules.Proj("up_proj"), rules.Proj("down_proj"), act="act_fn")
LLAMA_EXPERTS = ("gate_proj", "up_proj", "down_proj")  # a 4.x expert MLP's gate, up and down


@dataclass(frozen=True)
class Topology:
    """Where the modules of a causal LM are, as attribute names: ``base`` on the model;
    ``layers``, ``embedding``, ``positions`` (learned position embeddings, if any) and
    ``final_norm`` on the base; ``lm_head`` on the model. ``cache``: the keyword under which a
    decoder layer hands its attention the cache, where it has its own name."""

    base: str = "model"
    layers: str = "layers"
    embedding: str = "embed_tokens"
    positions: str | None = None
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    cache: str | None = None


MLPRule = rules.GatedMLP | rules.SparseMoE | rules.MLP | rules.ClampedExperts


@dataclass(frozen=True)
class Family:
    """A declarative map of one architecture: which module plays which role, and how.

    ``classes``: role -> the stock class names accepted (anything else is refused);
    ``topology``: where the layers, embedding, final norm and LM head are;
    ``layer_roles``: decoder-layer attribute -> role, in the order the layer uses them;
    ``attention`` / ``mlp``: the rules' maps (which projection is the value, the gate...);
    ``mlps``: MLP class name -> its rule, where a family mixes kinds of MLP (dense layers
    between sparse ones); ``logits_scaling``: the config attribute the LM head's output is
    divided by (Granite), which the components then are too; ``residual_multiplier``: the
    config attribute each block's output is multiplied by before the residual add (Granite);
    ``norm``: the rule of every norm (:class:`rules.RMSNorm`, with an offset of 1 for norms
    that scale by ``1 + weight``, or :class:`rules.LayerNorm`); ``inner``: classes allowed
    inside the attention and MLP besides ``nn.Linear`` (q/k norms, routers);
    ``checks``: what the family refuses beyond the common checks; ``notes``: what it needed.
    """

    name: str
    model_classes: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]
    topology: Topology = field(default_factory=Topology)
    layer_roles: dict[str, str] = field(default_factory=lambda: dict(STANDARD_LAYER))
    attention: rules.Attention = field(default_factory=lambda: LLAMA_ATTENTION)
    mlp: MLPRule = field(default_factory=lambda: SWIGLU)
    mlps: dict[str, MLPRule] = field(default_factory=dict)
    logits_scaling: str | None = None
    residual_multiplier: str | None = None
    norm: rules.Norm = field(default_factory=rules.RMSNorm)
    # role -> the decoder-layer norm applied to that block's output before the residual add
    # (OLMo 2 and Gemma's post-norms; Llama's ``post_attention_layernorm`` is a pre-norm)
    post_norms: dict[str, str] = field(default_factory=dict)
    inner: tuple[str, ...] = ()
    checks: Callable[[nn.Module], list[str]] | None = None
    notes: str = ""
    # decoder-layer attributes a layer may hold as None (a hybrid's attention or Mamba layer,
    # a dense layer's experts): those layers go without that role
    optional: tuple[str, ...] = ()
    mixer: Any = None  # the rule of a MIXER role (rules.mamba.Mamba2)

    # -- the topology: every module the engines touch, found here and nowhere else --------
    def _find(self, owner: nn.Module, attr: str) -> Any:
        module: Any = owner
        for part in attr.split("."):  # a dotted path: model.language_model
            module = _compat.attribute(module, part) if module is not None else None
        if module is None:
            raise UnsupportedModelError([f"{type(owner).__name__} has no {attr!r} ({self.name} family)"])
        return module

    def base(self, model: nn.Module) -> nn.Module:
        return self._find(model, self.topology.base)  # type: ignore[no-any-return]

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self._find(self.base(model), self.topology.layers))

    def embedding(self, model: nn.Module) -> nn.Module:
        return self._find(self.base(model), self.topology.embedding)  # type: ignore[no-any-return]

    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        """The token embedding and, where the model learns them, the position embeddings: a
        position's embedding belongs to the token at that position."""
        found = [self.embedding(model)]
        if self.topology.positions is not None:
            found.append(self._find(self.base(model), self.topology.positions))
        return found

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self._find(self.base(model), self.topology.final_norm)  # type: ignore[no-any-return]

    def lm_head(self, model: nn.Module) -> nn.Module:
        return self._find(model, self.topology.lm_head)  # type: ignore[no-any-return]

    def cache_keywords(self) -> tuple[str, ...]:
        """The keywords a decoder layer may pass its attention the cache under."""
        own = () if self.topology.cache is None else (self.topology.cache,)
        return (*own, *_compat.CACHE_KEYWORDS)

    def layer_modules(self, layer: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
        """``(attribute, role, module)`` of a decoder layer, in :attr:`layer_roles`' order."""
        for attr, role in self.layer_roles.items():
            if attr in self.optional and getattr(layer, attr, None) is None:
                continue
            yield attr, role, self._find(layer, attr)

    def block(self, layer: nn.Module, role: str) -> nn.Module:
        """A decoder layer's attention or MLP (``role``: :data:`ATTENTION` or :data:`MLP`)."""
        for _, found, module in self.layer_modules(layer):
            if found == role:
                return module
        raise UnsupportedModelError([f"{type(layer).__name__} has no {role} ({self.name} family)"])

    def mlp_rule(self, module: nn.Module) -> MLPRule:
        """The rule of one MLP module: by its class where the family mixes kinds."""
        return self.mlps.get(type(module).__name__, self.mlp)

    def head_dim(self, attention: nn.Module) -> int:
        """The size of one attention head of an attention module."""
        size = getattr(attention, "v_head_dim", None) or getattr(attention, "head_dim", None)
        size = size or getattr(attention, "head_size", None)  # v_head_dim: a latent attention's values
        if size is None:
            raise UnsupportedModelError([f"{type(attention).__name__} has no head_dim ({self.name} family)"])
        return int(size)

    # -- the logits ------------------------------------------------------------------------
    def logit_scale(self, model: nn.Module) -> float:
        """What the LM head's output is multiplied by before it is a logit (1 but for a
        ``logits_scaling`` family): a linear map, so the components get it too."""
        if self.logits_scaling is None:
            return 1.0
        return 1.0 / float(getattr(text_config(model), self.logits_scaling))

    def head_weight(self, model: nn.Module) -> Tensor:
        """The LM head's weight as the logits see it (with :meth:`logit_scale`)."""
        weight = _offload.weight(self.lm_head(model))
        scale = self.logit_scale(model)
        return weight if scale == 1.0 else weight * scale

    def residual_scale(self, model: nn.Module) -> float:
        """What each block's output is multiplied by before it joins the residual stream."""
        if self.residual_multiplier is None:
            return 1.0
        return float(getattr(text_config(model), self.residual_multiplier))

    def final_softcap(self, model: nn.Module) -> float | None:
        """The final-logit soft-cap (Gemma): components sum to the logit before it."""
        value = getattr(text_config(model), "final_logit_softcapping", None)
        return float(value) if value else None


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
    for embedding in family.embeddings(model):
        yield EMBEDDING, embedding
    for layer in family.layers(model):
        for _, role, module in family.layer_modules(layer):
            yield role, module
    yield NORM, family.final_norm(model)
    yield LM_HEAD, family.lm_head(model)


def refuse_missing_rules(model: nn.Module, family: Family, rule_set: rules.RuleSet) -> None:
    """Refuse, before any work, a model with a kind of module ``rule_set`` has no rule for
    (:meth:`rules.RuleSet.mlp` says which), and attention sinks under a path from uniform
    attention (whose constant logit the path does not pass)."""
    path = getattr(rule_set.attention, "path", 0)
    for role, module in roles(model, family):
        if role == MLP:
            rule_set.mlp(family.mlp_rule(module), module)
        if role == MIXER:
            rule_set.mlp(family.mixer, module)
        if role == ATTENTION and path and isinstance(getattr(module, "sinks", None), Tensor):
            raise UnsupportedOptionError(
                f"rules={rule_set.name!r}: {type(module).__name__} has attention sinks, whose "
                "constant logit the path from uniform attention does not pass: use rules='attnlrp' "
                "(or 'exact')"
            )


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
    if getattr(text_config(model), "pretraining_tp", 1) not in (1, None):
        problems.append("pretraining_tp > 1 is not supported: set config.pretraining_tp = 1")
    return problems


def _module_problems(model: nn.Module, family: Family) -> list[str]:
    problems = list(family.checks(model)) if family.checks else []
    names = {id(m): n for n, m in model.named_modules()}
    inline = False  # an attention computed inline, reported once
    for role, module in roles(model, family):
        where = names.get(id(module), "?")
        expected = family.classes.get(role, ())
        if role != LM_HEAD and type(module).__name__ not in expected:
            problems.append(
                f"{where}: expected the stock {' or '.join(expected)}, found {type(module).__name__}"
            )
            continue
        if role == ATTENTION and not _compat.uses_attention_interface(module):
            if not inline:
                problems.append(
                    f"{where}: {type(module).__name__} computes its attention inline in transformers "
                    f"{_compat.TRANSFORMERS_VERSION}, not through the attention interface llama_attrib "
                    "reads the probabilities from: upgrade transformers to 5.x"
                )
            inline = True
            continue
        inner = [("", module)] if role == LM_HEAD else []
        if role in (ATTENTION, MLP, MIXER):
            inner = [(f".{n}", c) for n, c in module.named_children()]
        for suffix, sub in inner:
            has_weights = any(True for _ in sub.parameters())
            if role == LM_HEAD and quantized.rounds(sub):
                problems.append(
                    f"{where}: the LM head is {quantized.kind(sub)}, whose kernel rounds the logits "
                    "themselves: load it unquantized (transformers' bitsandbytes loading skips "
                    "lm_head unless llm_int8_skip_modules says otherwise)"
                )
                continue
            if quantized.kind(sub) is not None:
                continue  # decomposed through its dequantized weight (llama_attrib.quantized)
            if type(sub) is nn.Linear or type(sub).__name__ in family.inner + family.classes.get(NORM, ()):
                for name, nested in sub.named_modules():
                    if name and quantized.kind(nested) is not None:  # a MoE's experts
                        problems.append(
                            f"{where}{suffix}.{name}: quantized experts are not supported: load the "
                            "experts unquantized (BitsAndBytesConfig(llm_int8_skip_modules=[...]))"
                        )
                        break
                continue
            if has_weights or "lora" in type(sub).__name__.lower() or isinstance(sub, nn.Linear):
                kind = f"{type(sub).__module__}.{type(sub).__qualname__}"
                problems.append(
                    f"{where}{suffix}: {kind} is not a plain torch.nn.Linear: merge adapters into the "
                    "weights first (PEFT/LoRA: model.merge_and_unload()); of quantized layers, "
                    "bitsandbytes 4-bit/8-bit and torchao weight-only are supported: load the "
                    "checkpoint with one of those, or unquantized"
                )
    quantized_params = {
        f"{n}.{p}" if n else p
        for n, m in model.named_modules()
        if quantized.kind(m) is not None
        for p, _ in m.named_parameters(recurse=False)
    }
    for name, param in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if param.device.type == "meta" and offloading_hook(owner) is None:
            problems.append(
                f"{name}: weights on the meta device that no accelerate offload hook loads "
                "(load the checkpoint, or dispatch it with accelerate's device_map / cpu_offload)"
            )
            break
        if not param.dtype.is_floating_point and name not in quantized_params:
            problems.append(
                f"{name}: dtype {param.dtype} in a layer llama_attrib cannot dequantize (supported: "
                "bitsandbytes 4-bit/8-bit and torchao weight-only linear layers)"
            )
            break
    return problems


def _load_builtin() -> None:
    from . import (  # noqa: F401
        deepseek,
        gemma,
        gpt2,
        gpt_neox,
        gpt_oss,
        granite,
        granite_hybrid,
        llama,
        mistral,
        mixtral,
        olmo2,
        phi3,
        qwen,
        qwen_moe,
        smollm3,
    )


_load_builtin()
