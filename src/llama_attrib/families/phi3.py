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


def _half(index: int):  # type: ignore[no-untyped-def]
    def rows(mlp: Any) -> slice:
        half = mlp.gate_up_proj.out_features // 2
        return slice(0, half) if index == 0 else slice(half, None)

    return rows


PHI3 = register_family(
    standard(
        "Phi3",
        attention=rules.Attention(value=rules.Proj("qkv_proj", _value_rows), out=rules.Proj("o_proj")),
        mlp=rules.GatedMLP(
            gate=rules.Proj("gate_up_proj", _half(0)),
            up=rules.Proj("gate_up_proj", _half(1)),
            down=rules.Proj("down_proj"),
            act="activation_fn",
        ),
        notes="fused projections: the value and the up rows are read from qkv_proj / gate_up_proj",
    )
)
