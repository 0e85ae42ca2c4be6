"""A plain forward that keeps the stock logits (before any soft-cap): the recording pass of
target mode (:func:`llama_attrib.sweep.record`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Args, Kwargs, Pass


class CapturePass(Pass):
    """Every module runs its stock forward; the LM head's logits are kept."""

    def lm_head(self, module: nn.Module, original: Any, args: Args, kwargs: Kwargs) -> Any:
        out = original(*args, **kwargs)
        self.keep_logits(out)
        return out
