"""GPT-NeoX (Pythia): LayerNorms, attention and MLP side by side on the same input (the
parallel residual), partial rotary embeddings, a fused query-key-value projection
interleaved per head, a GELU MLP without a gate, biases everywhere."""

from typing import Any

import torch
from torch import Tensor

from .. import rules
from . import ATTENTION, EMBEDDING, MLP, NORM, Family, Topology, register_family


def _value_rows(attention: Any) -> Tensor:
    """The value's rows of ``query_key_value``: its output is, per head, that head's query,
    key and value (``head_size`` each), so the values are the last third of each head's rows."""
    size = int(attention.head_size)
    weight = attention.query_key_value.weight
    heads = weight.shape[0] // (3 * size)
    head = torch.arange(heads, device=weight.device)[:, None] * 3 * size
    return (head + 2 * size + torch.arange(size, device=weight.device)[None]).flatten()


GPT_NEOX = register_family(
    Family(
        name="gpt_neox",
        model_classes=("GPTNeoXForCausalLM",),
        classes={
            NORM: ("LayerNorm",),
            ATTENTION: ("GPTNeoXAttention",),
            MLP: ("GPTNeoXMLP",),
            EMBEDDING: ("Embedding",),
        },
        topology=Topology(
            base="gpt_neox", embedding="embed_in", final_norm="final_layer_norm", cache="layer_past"
        ),
        layer_roles={
            "input_layernorm": NORM,
            "attention": ATTENTION,
            "post_attention_layernorm": NORM,
            "mlp": MLP,
        },
        attention=rules.Attention(value=rules.Proj("query_key_value", _value_rows), out=rules.Proj("dense")),
        mlp=rules.MLP(up=rules.Proj("dense_h_to_4h"), down=rules.Proj("dense_4h_to_h"), act="act"),
        norm=rules.LayerNorm(),
        notes=(
            "LayerNorm (centring linear, scale frozen, bias a bias share); GELU MLP (act(z)/z frozen); "
            "parallel residual and partial rotary in the stock layer; values read per head from the fused qkv"
        ),
    )
)
