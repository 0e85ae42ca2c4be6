"""Errors raised by llama_attrib: one base class and a few precise subclasses."""

from __future__ import annotations


class LlamaAttribError(Exception):
    """Base class of every error llama_attrib raises on purpose."""


class UnsupportedModelError(LlamaAttribError, ValueError):
    """The model, or an option it was loaded with, cannot be decomposed exactly.

    Raised before the model is touched; the message lists every problem found.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"llama_attrib cannot decompose this model:\n{lines}")


class UnsupportedOptionError(LlamaAttribError, ValueError):
    """A call option (of ``forward`` or ``generate``) cannot be decomposed exactly."""


class DecompositionError(LlamaAttribError, RuntimeError):
    """The decomposition went wrong at run time (an op that would drop components,
    a cache that was not built by a decomposed call, components that do not add up)."""
