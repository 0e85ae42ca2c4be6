"""llama_attrib: exact per-token decomposition of a stock Hugging Face causal LM (docs/families.md).

>>> model = llama_attrib.wrap(model)
>>> out = model.generate(ids, decompose=True, use_cache=True,
...                      return_dict_in_generate=True, output_attentions=True)
>>> c = out["attentions"][0]            # one pydec.Composition per generated token
>>> pred = c.recovery.argmax(0)
>>> c[pred].components                  # contribution of every earlier token
>>> result = llama_attrib.attribute(model, tokenizer, "The capital of France is")
>>> result.words().top_k(3)             # or result.to_html("out.html"), result.plot()
"""

from .api import decompose, decompose_answer, decompose_sequence, is_wrapped, unwrap, wrap
from .attribution import attribute
from .composition import LogitComposition
from .engines import TargetComposition
from .errors import (
    DecompositionError,
    GeneratedTokenWarning,
    LlamaAttribError,
    UnsupportedModelError,
    UnsupportedOptionError,
)
from .families import Family, register_family
from .flow import Flow, flow
from .memory import MemoryBudgetError
from .memory import estimate as estimate_memory
from .result import Attribution, Contributor

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Contributor",
    "DecompositionError",
    "Family",
    "Flow",
    "GeneratedTokenWarning",
    "LlamaAttribError",
    "LogitComposition",
    "MemoryBudgetError",
    "TargetComposition",
    "UnsupportedModelError",
    "UnsupportedOptionError",
    "__version__",
    "attribute",
    "decompose",
    "decompose_answer",
    "decompose_sequence",
    "estimate_memory",
    "flow",
    "is_wrapped",
    "register_family",
    "unwrap",
    "wrap",
]
