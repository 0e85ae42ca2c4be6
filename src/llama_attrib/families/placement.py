"""Where a model's inputs go, what dtype it computes in, and the config of its text model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedOptionError


def text_config(model: nn.Module) -> Any:
    """The config of the model's text model: a multimodal model's ``text_config`` (Gemma 3 and
    Mistral 3 as published), else the model's own."""
    return text_part(model.config)


def text_part(config: Any) -> Any:
    """A config's text model's config (:func:`text_config`, from the config itself)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a model (or one of its modules) computes in: its first floating-point
    parameter's (a quantized layer's storage is not one), else ``default``."""
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return default


def component_dtype(model: nn.Module) -> torch.dtype:
    """Components accumulate in float32 when the model runs in half precision."""
    dtype = model_dtype(model)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: its input embedding's device (the device accelerate
    runs it on, when it keeps the weights offloaded)."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    hook = getattr(embedding, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    weight: Tensor = embedding.weight
    return weight.device


def to_input_device(model: nn.Module, *tensors: Tensor | None) -> tuple[Any, ...]:
    """Each tensor (ids, a mask, position ids) moved to :func:`input_device`; None stays."""
    device = input_device(model)
    return tuple(t if t is None or t.device == device else t.to(device) for t in tensors)


def check_length(model: nn.Module, length: int) -> None:
    """Refuse sequences longer than the positions the model was built for."""
    limit = getattr(text_config(model), "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise UnsupportedOptionError(
            f"the sequence would have {length} positions, more than the model's "
            f"max_position_embeddings ({limit}): shorten the prompt or max_new_tokens"
        )


IMAGE_INPUTS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw")


def refuse_images(kwargs: dict[str, Any]) -> None:
    """A multimodal model decomposes its text path: image inputs are refused before any work."""
    given = [key for key in IMAGE_INPUTS if kwargs.get(key) is not None]
    if given:
        raise UnsupportedOptionError(
            f"{', '.join(given)}: llama_attrib decomposes the text path of a multimodal model; image "
            "tokens are not sources (yet): call it with input_ids (text) only"
        )
