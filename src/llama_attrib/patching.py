"""The only code that swaps forwards on module instances.

A patch replaces one attribute (``forward`` or ``generate``) in one instance's ``__dict__``.
What the ``__dict__`` held before (often nothing: the class attribute shows through; with
accelerate, its own per-instance forward) is recorded and put back exactly on restore, so
an unwrapped model has the very ``__dict__`` it had before wrapping.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

_MISSING = object()


@dataclass
class Patch:
    """One replaced attribute of one module instance."""

    module: nn.Module
    name: str
    previous: Any  # what module.__dict__ held under ``name``, or _MISSING

    def restore(self) -> None:
        if self.previous is _MISSING:
            self.module.__dict__.pop(self.name, None)
        else:
            self.module.__dict__[self.name] = self.previous


def replace_method(
    module: nn.Module, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Patch:
    """Replace ``module.<name>`` by ``make(current_bound_method)``.

    The replacement keeps the original's ``__name__``, docstring and signature
    (``functools.wraps``): ``generate`` inspects ``forward``'s signature to decide which
    arguments (``position_ids``, ``logits_to_keep``) to pass.
    """
    previous = module.__dict__.get(name, _MISSING)
    current = getattr(module, name)
    replacement = functools.wraps(current)(make(current))
    module.__dict__[name] = replacement
    return Patch(module, name, previous)


def replace_value(module: nn.Module, name: str, value: Any) -> Patch:
    """Set ``module.__dict__[name]`` (a per-instance attribute), recording what was there."""
    previous = module.__dict__.get(name, _MISSING)
    module.__dict__[name] = value
    return Patch(module, name, previous)


def restore_all(patches: list[Patch]) -> None:
    """Undo patches in reverse order of installation."""
    for patch in reversed(patches):
        patch.restore()
    patches.clear()
