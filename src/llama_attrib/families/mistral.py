"""Mistral: Llama's layout with sliding-window attention (in the stock mask)."""

import dataclasses

from . import Topology, register_family, standard

MISTRAL = register_family(
    standard("Mistral", notes="sliding window: the stock mask, read by the probabilities")
)

# Mistral Small 3.x as published: Mistral's text model inside a multimodal wrapper
MISTRAL3_PUBLISHED = register_family(
    dataclasses.replace(
        MISTRAL,
        name="mistral3",
        model_classes=("Mistral3ForConditionalGeneration",),
        topology=Topology(base="model.language_model"),
        notes=MISTRAL.notes + "; as published (Mistral3ForConditionalGeneration): the text path",
    )
)
