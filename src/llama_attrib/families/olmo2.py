"""OLMo 2: norms after the attention and the MLP (not before), q/k norms over the projection."""

from . import ATTENTION, MLP, NORM, register_family, standard

OLMO2 = register_family(
    standard(
        "Olmo2",
        layer_roles={
            "self_attn": ATTENTION,
            "post_attention_layernorm": NORM,
            "mlp": MLP,
            "post_feedforward_layernorm": NORM,
        },
        post_norms={"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
        inner=("Olmo2RMSNorm",),
        notes="post-norms (frozen scales on the block outputs); q/k norms inside the probabilities",
    )
)
