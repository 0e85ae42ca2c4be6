"""Faithfulness evaluation of llama_attrib's decomposition against common baselines.

Run it with ``python -m llama_attrib.evaluation [--limit N] [--methods a,b] [--out results.json]``;
the prompt set is :func:`load_prompts`, the methods :data:`METHODS`, the metrics in
:mod:`llama_attrib.evaluation.metrics`. The baselines need ``captum`` (extra ``eval``).
"""

from .harness import Config, evaluate_prompt, format_table, report, summarize
from .methods import METHODS, Setup
from .prompts import CATEGORIES, Prompt, encode, load_prompts

__all__ = [
    "CATEGORIES",
    "METHODS",
    "Config",
    "Prompt",
    "Setup",
    "encode",
    "evaluate_prompt",
    "format_table",
    "load_prompts",
    "report",
    "summarize",
]
