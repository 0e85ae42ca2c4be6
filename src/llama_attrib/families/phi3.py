"""Phi-3 / Phi-3.5 / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj``."""

from typing import Any

from .. import rules
from . import register_family, standard


def _value_rows(attention: Any) -> slice:
    """The value's rows of the fused qkv projection: after the queries' and keys'."""
    config = attention.config
    head_dim = int(attention.head_dim)
    start = (config.num_attention_heads + config.num_key_value_heads) * head_dim
    return slice(start, None)


PHI3 = register_family(
    standard(
        "Phi3",
        attention=rules.Attention(value=rules.Proj("qkv_proj", _value_rows), out=rules.Proj("o_proj")),
        mlp=rules.mlp.fused_gated_mlp("gate_up_proj", "down_proj", act="activation_fn"),
        notes="fused projections: the value and the up rows are read from qkv_proj / gate_up_proj",
    )
)
