"""Reading a call's options: the mode asked for, the arguments of a bound call, the memory
a forward-mode call needs, and the prompt's ids."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .. import families, memory
from ..engines import MODES
from ..errors import UnsupportedOptionError


def check_fits(
    model: nn.Module, length: int, batch: int, mode: str, max_memory: Any, dtype: torch.dtype
) -> None:
    """Forward mode keeps every component at once: refuse, before starting, what cannot fit."""
    needed = memory.estimate(model, length, batch=batch, mode=mode, dtype=dtype)
    limit = memory.model_budget(model, max_memory)
    if needed > limit:
        raise memory.MemoryBudgetError(
            f"forward-mode decomposition of {batch} x {length} tokens needs about "
            f"{memory.fmt(needed)}; the budget is {memory.fmt(limit)} (max_memory, default 80% of "
            "the free memory). Use decompose=True (target mode: memory does not grow with the "
            "number of components), or llama_attrib.decompose_sequence(..., mode='forward'), "
            "which processes components in chunks that fit"
        )


def decompose_mode(decompose: bool | str | None, default: str) -> str:
    """``True``/``None`` -> the call's default mode; a string must name a mode."""
    if decompose is True or decompose is None:
        return default
    if decompose in MODES:
        return str(decompose)
    raise UnsupportedOptionError(f"decompose must be True, False or one of {MODES}, not {decompose!r}")


def call_options(bound: inspect.BoundArguments, signature: inspect.Signature) -> dict[str, Any]:
    """All arguments of a bound call, with the ``**kwargs`` ones flattened in."""
    options = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            options.update(options.pop(name, {}))
    return options


def set_option(bound: inspect.BoundArguments, signature: inspect.Signature, key: str, value: Any) -> None:
    if key in signature.parameters:
        bound.arguments[key] = value
        return
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            bound.arguments.setdefault(name, {})[key] = value


def prompt_ids_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor):
        raise UnsupportedOptionError("decompose=True needs the prompt's input_ids as a tensor")
    return ids


INPUTS = ("input_ids", "inputs", "attention_mask", "position_ids", "inputs_embeds", "cache_position")


def on_input_device(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """``(args, kwargs)`` with the input tensors (the first positional argument, and ids, masks
    and positions by keyword) on the model's input device, wherever the caller made them."""
    if args and isinstance(args[0], torch.Tensor):
        args = (*families.to_input_device(model, args[0]), *args[1:])
    moved = {k: kwargs[k] for k in INPUTS if isinstance(kwargs.get(k), torch.Tensor)}
    kwargs = {**kwargs, **dict(zip(moved, families.to_input_device(model, *moved.values()), strict=True))}
    return args, kwargs
