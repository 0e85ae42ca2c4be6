"""Llama (and SmolLM, Llama 2/3, TinyLlama...): the reference layout."""

from . import register_family, standard

LLAMA = register_family(standard("Llama", notes="the reference: RMSNorm, rope, GQA, SwiGLU"))
