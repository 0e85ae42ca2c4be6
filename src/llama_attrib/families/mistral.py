"""Mistral: Llama's layout with sliding-window attention (in the stock mask)."""

from . import register_family, standard

MISTRAL = register_family(
    standard("Mistral", notes="sliding window: the stock mask, read by the probabilities")
)
