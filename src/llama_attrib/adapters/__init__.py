"""The Hugging Face side: the replacement ``forward`` and ``generate`` of a wrapped model.

They read generate's and forward's options, refuse what cannot be decomposed, and hand the
work to the engines, which attach to the model through the session layer
(:func:`llama_attrib.session.attached`); this package never imports the public API.
"""

from .forward import forward_adapter
from .generate import generate_adapter

__all__ = ["forward_adapter", "generate_adapter"]
