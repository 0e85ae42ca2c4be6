"""``attnlrp-path`` against an independent reference on the stock model.

The reference knows no formula of the library's kernel (``rules/lrp.py``). It is AttnLRP's
rules as forward hooks (``conftest.credited_factors``), with one attention function of this
file registered in transformers' ``AttentionInterface``. That function computes
``softmax(z) v`` as the eager implementation does. Its backward is attnlrp-path's rule taken
from its definition:

- the values get ``(P + U)^T g``, where ``U`` is uniform attention over the visible keys; the
  hook on ``v_proj`` halves this to ``value * P + (1 - value) * U``;
- the scores get the integrated gradient of ``P(alpha z) . dP`` along ``alpha`` from 0 to 1.
  Each of its midpoints is the vector-Jacobian product of ``torch.softmax`` taken by autograd
  (``torch.func.vjp``); the hooks on ``q_proj`` and ``k_proj`` give a quarter each.

Gradient x input over the embeddings of that graph gives each token's component.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from conftest import credited_factors, gradient_x_input, prompt
from llama_attrib import rules
from test_families import family_model
from test_rule_sets import P, explained

NAME = "llama_attrib_tests_path_reference"


class PathMix(torch.autograd.Function):
    """``softmax(z) @ v``; its backward is attnlrp-path's rule, integrated with ``steps`` midpoints."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, v: torch.Tensor, steps: int) -> torch.Tensor:
        p = torch.softmax(z, dim=-1)
        ctx.save_for_backward(z, v, p)
        ctx.steps = steps
        return p @ v

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        z, v, p = ctx.saved_tensors
        visible = (z > torch.finfo(z.dtype).min / 2).to(z.dtype)
        uniform = visible / visible.sum(-1, keepdim=True)
        dv = (p + uniform).transpose(-1, -2) @ g
        dp = g @ v.transpose(-1, -2)
        dz = torch.zeros_like(z)
        for j in range(ctx.steps):
            _, pull = torch.func.vjp(lambda x: torch.softmax(x, dim=-1), z * ((j + 0.5) / ctx.steps))
            dz += pull(dp)[0]
        return dz / ctx.steps, dv, None


def path_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    steps: int,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    z = (query @ key.transpose(2, 3)).float() * scaling
    if attention_mask is not None:  # eager's additive mask (registered below), window included
        z = z + attention_mask[:, :, :, : key.shape[-2]]
    out = PathMix.apply(z, value.float(), steps).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def path_factors(model: nn.Module, steps: int) -> Iterator[list[torch.Tensor]]:
    """``credited_factors`` with this file's attention function in place of the eager one."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(NAME, functools.partial(path_attention, steps=steps))
    AttentionMaskInterface.register(NAME, eager_mask)
    before = model.config._attn_implementation
    model.config._attn_implementation = NAME
    try:
        with credited_factors(model) as head_out:
            yield head_out
    finally:
        model.config._attn_implementation = before


@pytest.mark.parametrize(("name", "steps"), [("llama", 4), ("llama", 64), ("mistral", 4)])
def test_attnlrp_path_equals_the_integrated_rule_on_the_stock_model(name: str, steps: int) -> None:
    """Every component, and what no token got, equal the reference with the same midpoints
    (4: the rule set's own; 64: near the integral), on Llama and on Mistral's sliding window
    shorter than the prompt."""
    model = family_model(name)
    ids = prompt(9)
    chosen = rules.sets.PATH.with_rule(rules.sets.ATTENTION, rules.sets.Credited(path=steps))
    factors = functools.partial(path_factors, steps=steps)
    for k, c in enumerate(explained(model, ids, chosen)):
        token = int(ids[0, P + k])
        components, rest, logit = gradient_x_input(model, ids[:, : P + k], token, factors=factors)
        scale = max(float(components.abs().max()), abs(logit))
        assert torch.allclose(c.components, components, atol=1e-5 * scale, rtol=0), (name, steps, k)
        assert abs(float(c.residual) - rest) <= 1e-5 * scale
    assert model.config._attn_implementation == "eager"


def test_the_reference_is_not_attnlrp() -> None:
    """The reference tells the rule sets apart: attnlrp's components are not the path's."""
    model = family_model("llama")
    ids = prompt(9)
    factors = functools.partial(path_factors, steps=4)
    c = explained(model, ids, "attnlrp")[0]
    components, _, _ = gradient_x_input(model, ids[:, :P], int(ids[0, P]), factors=factors)
    assert not torch.allclose(c.components, components, atol=1e-3 * float(components.abs().max()), rtol=0)
