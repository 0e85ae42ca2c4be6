"""Weights that accelerate keeps offloaded (``device_map`` with CPU/disk offload, ``cpu_offload``).

accelerate replaces such a module's parameters by ``meta`` tensors and loads them in its
hook's ``pre_forward`` for the length of one call. The rules read weights outside the stock
forward (to apply them to components), so they load them the same way, for the length of
one rule: :func:`weight` returns a tensor that stays valid after the module is offloaded
again (it holds the loaded storage).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from . import quantized


def offloading_hook(module: nn.Module) -> object | None:
    """accelerate's hook if it offloads this module's own weights, else None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    hooks = getattr(hook, "hooks", None) or [hook]  # a SequentialHook holds several
    return hook if any(getattr(h, "offload", False) for h in hooks) else None


@contextmanager
def loaded(module: nn.Module) -> Iterator[nn.Module]:
    """The module with its weights on its execution device for the block's length."""
    hook = offloading_hook(module)
    if hook is None:
        yield module
        return
    hook.pre_forward(module)  # type: ignore[attr-defined]
    try:
        yield module
    finally:
        hook.post_forward(module, None)  # type: ignore[attr-defined]


def weight(module: nn.Module) -> Tensor:
    """``module.weight``, detached, loaded if accelerate offloads it; a quantized layer's
    dequantized weight (:func:`llama_attrib.quantized.dense`)."""
    with loaded(module):
        if quantized.kind(module) is not None:
            return quantized.dense(module)
        value: Tensor = module.weight  # type: ignore[assignment]
        return value.detach()
