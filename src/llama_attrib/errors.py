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


class GeneratedTokenWarning(UserWarning):
    """A generated token is not the argmax of the logits its step explains (sampling, a logits
    processor): ``c[c.token]`` explains the generated token, ``c[c.recovery.argmax(0)]`` not."""


def require(module: str, extra: str, what: str) -> None:
    """Import ``module`` or say which extra of llama_attrib installs it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs {module}, which is not installed: install llama_attrib's {extra!r} extra "
            f"(in its clone: pip install -e '.[{extra}]'), or pip install {module}"
        ) from e
