"""Gemma 2 and Gemma 3 (text): ``(1 + w)`` RMSNorms, scaled embeddings, sandwich norms,
attention and final-logit soft-capping, sliding windows."""

import dataclasses

from .. import rules
from . import ATTENTION, MLP, NORM, Topology, register_family, standard

SANDWICH = {
    "input_layernorm": NORM,
    "self_attn": ATTENTION,
    "post_attention_layernorm": NORM,
    "pre_feedforward_layernorm": NORM,
    "mlp": MLP,
    "post_feedforward_layernorm": NORM,
}
NOTES = (
    "(1 + w) norms; embedding scale is linear; attention soft-cap and windows inside the frozen "
    "probabilities; components sum to the logit before the final soft-cap"
)

GEMMA2 = register_family(
    standard(
        "Gemma2",
        classes={"embedding": ("Embedding", "Gemma2TextScaledWordEmbedding")},
        layer_roles=SANDWICH,
        post_norms={"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
        norm=rules.RMSNorm(offset=1.0),
        notes=NOTES,
    )
)
GEMMA3 = register_family(
    standard(
        "Gemma3",
        classes={"embedding": ("Gemma3TextScaledWordEmbedding",)},
        layer_roles=SANDWICH,
        post_norms={"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
        norm=rules.RMSNorm(offset=1.0),
        inner=("Gemma3RMSNorm",),
        notes=NOTES + "; q/k norms inside the probabilities",
    )
)

# Gemma 3 4B/12B/27B as published: the text model inside a multimodal wrapper, whose text path
# decomposes as Gemma 3's (image inputs are refused: families.refuse_images)
GEMMA3_PUBLISHED = register_family(
    dataclasses.replace(
        GEMMA3,
        model_classes=("Gemma3ForConditionalGeneration",),
        topology=Topology(base="model.language_model"),
        notes=GEMMA3.notes + "; as published (Gemma3ForConditionalGeneration): the text path",
    )
)
