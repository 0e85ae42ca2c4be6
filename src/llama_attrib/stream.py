"""The residual stream as it flows through the stock modules while decomposing.

A :class:`DecomposedTensor` *is* the real hidden state (same storage, same values, so the
stock decoder layer, model loop, masks and rotary embedding compute exactly what they
always compute) and carries beside it ``components``: a tensor of shape
``[components, *real.shape]`` whose sum over the first dimension is the real tensor, up to
rounding.

Only the operations that the stock code applies to the stream between the leaf modules are
handled (residual ``+``, slicing, device moves, reading metadata). Any other operation that
would turn the stream into a new tensor raises :class:`DecompositionError`: silently
dropping the components would give plausible and wrong numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .errors import DecompositionError

_Handler = Callable[..., Any]
_HANDLERS: dict[Any, _Handler] = {}

# Ops that read only shape, dtype or device: their tensor results do not carry the
# stream's values, so returning them without components loses nothing.
_VALUE_FREE = {
    torch.Tensor.new_empty,
    torch.Tensor.new_zeros,
    torch.Tensor.new_ones,
    torch.Tensor.new_full,
    torch.empty_like,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
}


class DecomposedTensor(Tensor):
    """A real tensor plus its decomposition ``components`` (``[C, *shape]``)."""

    components: Tensor
    base: Tensor
    residual: Tensor | None  # the share of no token (biases), or None while there is none

    @staticmethod
    def wrap(real: Tensor, components: Tensor, residual: Tensor | None = None) -> DecomposedTensor:
        """Pair a plain tensor with its components (and bias share); checks the shapes."""
        if tuple(components.shape[1:]) != tuple(real.shape):
            raise DecompositionError(
                f"components of shape {tuple(components.shape)} do not match the hidden "
                f"state of shape {tuple(real.shape)}"
            )
        with torch._C.DisableTorchFunctionSubclass():
            out = real.as_subclass(DecomposedTensor)
        out.base = real
        out.components = components
        out.residual = residual
        return out

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        plain_args, plain_kwargs = tree_map(_plain, (args, kwargs))
        out = func(*plain_args, **plain_kwargs)
        if func not in _VALUE_FREE and _has_tensor(out):
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise DecompositionError(
                f"operation {name!r} was applied to the decomposed hidden state outside a "
                "module that llama_attrib knows how to decompose; its result would lose the "
                "components. This model's code path is not supported: please report it."
            )
        return out


def _plain(value: Any) -> Any:
    return value.base if isinstance(value, DecomposedTensor) else value


def _has_tensor(value: Any) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, Tensor)
        return v

    tree_map(visit, value)
    return found


def _handles(*funcs: Any) -> Callable[[_Handler], _Handler]:
    def register(handler: _Handler) -> _Handler:
        for f in funcs:
            _HANDLERS[f] = handler
        return handler

    return register


@_handles(torch.Tensor.__add__, torch.Tensor.__radd__, torch.add, torch.Tensor.add)
def _add(a: Any, b: Any, **kwargs: Any) -> DecomposedTensor:
    """Residual add: real tensors add as the stock code adds them, components add."""
    if kwargs:
        raise DecompositionError(f"residual add with options {sorted(kwargs)} is not supported")
    if not (isinstance(a, DecomposedTensor) and isinstance(b, DecomposedTensor)):
        raise DecompositionError(
            "a plain tensor was added to the decomposed hidden state (a bias or an external "
            "input) outside llama_attrib's rules: this model's code path is not supported"
        )
    residual = (
        a.residual if b.residual is None else b.residual if a.residual is None else a.residual + b.residual
    )
    return DecomposedTensor.wrap(a.base + b.base, a.components + b.components, residual)


@_handles(torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul, torch.Tensor.mul)
def _mul(a: Any, b: Any, **kwargs: Any) -> DecomposedTensor:
    """Scaling by a constant (Gemma's embedding scale): linear, so every component scales."""
    stream, other = (a, b) if isinstance(a, DecomposedTensor) else (b, a)
    if kwargs or isinstance(other, DecomposedTensor):
        raise DecompositionError("the decomposed hidden state was multiplied by itself: not linear")
    other = other.to(stream.components) if isinstance(other, Tensor) else other
    residual = None if stream.residual is None else stream.residual * other
    real = stream.base * (other.to(stream.base) if isinstance(other, Tensor) else other)
    return DecomposedTensor.wrap(real, stream.components * other, residual)


@_handles(torch.nn.functional.dropout)
def _dropout(t: DecomposedTensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
    """Dropout in evaluation (Phi-3's residual dropouts): the identity."""
    if training and p > 0:
        raise DecompositionError("dropout is active (training mode): call model.eval() first")
    return t


@_handles(torch.Tensor.__getitem__)
def _getitem(t: DecomposedTensor, index: Any) -> DecomposedTensor:
    """Slicing (e.g. ``hidden[:, -1:, :]`` before the LM head) slices every component."""
    index = tree_map(_plain, index)
    comp_index = (slice(None), *index) if isinstance(index, tuple) else (slice(None), index)
    residual = None if t.residual is None else t.residual[index]
    return DecomposedTensor.wrap(t.base[index], t.components[comp_index], residual)


@_handles(torch.Tensor.view, torch.Tensor.reshape)
def _view(t: DecomposedTensor, *shape: Any) -> DecomposedTensor:
    """A new shape (GPT-2 views the final hidden state as ``(-1, seq, hidden)``): each
    component and the bias share take the real tensor's new shape."""
    if shape and isinstance(shape[0], torch.dtype):
        raise DecompositionError("the decomposed hidden state was reinterpreted as another dtype")
    real = t.base.reshape(*shape)
    components = t.components.reshape(t.components.shape[0], *real.shape)
    residual = None if t.residual is None else t.residual.reshape(real.shape)
    return DecomposedTensor.wrap(real, components, residual)


@_handles(torch.Tensor.to)
def _to(t: DecomposedTensor, *args: Any, **kwargs: Any) -> DecomposedTensor:
    """Moves follow the real tensor's device; components keep their own precision."""
    real = t.base.to(*args, **kwargs)
    residual = None if t.residual is None else t.residual.to(device=real.device)
    return DecomposedTensor.wrap(real, t.components.to(device=real.device), residual)


@_handles(torch.Tensor.contiguous)
def _contiguous(t: DecomposedTensor, *args: Any, **kwargs: Any) -> DecomposedTensor:
    return DecomposedTensor.wrap(t.base.contiguous(*args, **kwargs), t.components, t.residual)


def split(value: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(real, components, residual)`` of a decomposed tensor; a plain tensor is an error."""
    if not isinstance(value, DecomposedTensor):
        raise DecompositionError(
            "a decomposed module received a plain tensor: the components were lost upstream "
            "(a hook or module outside llama_attrib's rules replaced the hidden state)"
        )
    return value.base, value.components, value.residual


def strip(value: Any) -> Any:
    """Replace every DecomposedTensor inside ``value`` (tuples, dicts) by its real tensor."""
    return tree_map(_plain, value)
