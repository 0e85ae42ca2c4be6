"""The passes: what the wrapped leaf modules do during one decomposing call.

A wrapped model's leaf modules (embedding, norms, attention, MLP, LM head) each hand their
call to the session's active pass, one method per role; with none active they run their
stock forward. Each mode is a pass that owns its per-call state: :class:`ForwardPass`
(components beside the real hidden state), :class:`TargetPass` (one layer as a
differentiable frozen-factor map) and :class:`CapturePass` (the stock logits).
"""

from .base import Pass, argument, hidden_states, replace_hidden
from .capture import CapturePass
from .forward import FlowRecord, ForwardPass
from .target import TargetPass

__all__ = [
    "CapturePass",
    "FlowRecord",
    "ForwardPass",
    "Pass",
    "TargetPass",
    "argument",
    "hidden_states",
    "replace_hidden",
]
