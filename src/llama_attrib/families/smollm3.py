"""SmolLM3: Llama's layout in which some layers apply no rotary embedding (``no_rope_layers``):
the queries and keys the frozen probabilities are computed from are whatever the layer made."""

from . import register_family, standard

SMOLLM3 = register_family(
    standard("SmolLM3", notes="layers without rope: the probabilities read the stock queries and keys")
)
