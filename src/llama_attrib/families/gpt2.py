"""GPT-2: learned position embeddings (a position's embedding belongs to the token at that
position), LayerNorms, ``Conv1D`` projections (weights stored ``[in, out]``), a fused
query-key-value projection, a GELU MLP without a gate, biases everywhere."""

from typing import Any

from torch import nn

from .. import _compat, rules
from . import ATTENTION, EMBEDDING, MLP, NORM, Family, Topology, register_family


def _value_columns(attention: Any) -> slice:
    """The value's outputs of ``c_attn``: queries, keys and values one after the other."""
    size = int(attention.split_size)
    return slice(2 * size, 3 * size)


def _checks(model: nn.Module) -> list[str]:
    config: Any = model.config
    problems = []
    if getattr(config, "reorder_and_upcast_attn", False):
        problems.append("reorder_and_upcast_attn computes the attention inline: set it to False")
    if getattr(config, "add_cross_attention", False):
        problems.append("cross-attention (add_cross_attention) is not supported")
    if not _compat.ATTENTION_SCALING_PASSED and (
        getattr(config, "scale_attn_by_inverse_layer_idx", False)
        or not getattr(config, "scale_attn_weights", True)
    ):
        problems.append(
            f"on transformers {_compat.TRANSFORMERS_VERSION} GPT-2's attention does not say its scaling "
            "(scale_attn_by_inverse_layer_idx, scale_attn_weights=False): upgrade transformers to 5.x"
        )
    return problems


GPT2 = register_family(
    Family(
        name="gpt2",
        model_classes=("GPT2LMHeadModel",),
        classes={
            NORM: ("LayerNorm",),
            ATTENTION: ("GPT2Attention",),
            MLP: ("GPT2MLP",),
            EMBEDDING: ("Embedding",),
        },
        topology=Topology(
            base="transformer", layers="h", embedding="wte", positions="wpe", final_norm="ln_f"
        ),
        layer_roles={"ln_1": NORM, "attn": ATTENTION, "ln_2": NORM, "mlp": MLP},
        attention=rules.Attention(
            value=rules.Proj("c_attn", _value_columns, transposed=True),
            out=rules.Proj("c_proj", transposed=True),
        ),
        mlp=rules.MLP(
            up=rules.Proj("c_fc", transposed=True), down=rules.Proj("c_proj", transposed=True), act="act"
        ),
        norm=rules.LayerNorm(),
        inner=("Conv1D",),
        checks=_checks,
        notes=(
            "learned positions credited to their token; LayerNorm; Conv1D projections; GELU MLP (act(z)/z "
            "frozen); the values read from the fused c_attn"
        ),
    )
)
