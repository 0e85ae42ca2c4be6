"""Granite (3.x): Llama's layout with four multipliers, all linear: the embeddings are
multiplied before the first layer, each block's output before the residual add, the
attention scores by ``attention_multiplier`` (inside the frozen probabilities), and the LM
head's output is divided by ``logits_scaling`` (so are the components)."""

from . import register_family, standard

GRANITE = register_family(
    standard(
        "Granite",
        logits_scaling="logits_scaling",
        residual_multiplier="residual_multiplier",
        notes="embedding, residual, attention and logit multipliers: linear, carried exactly",
    )
)
