"""LogitComposition: lazy indexing equals the materialised pydec Composition."""

from __future__ import annotations

import pydec
import torch

from llama_attrib import LogitComposition


def make(batch: tuple[int, ...] = ()) -> LogitComposition:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, *batch, 8, generator=g)
    weight = torch.randn(11, 8, generator=g)
    return LogitComposition(hidden, weight, (hidden.sum(0) @ weight.T))


def test_lazy_index_equals_full_components() -> None:
    c = make()
    full = c.components
    assert full.shape == (5, 11) and c.shape == (11,) and c.numc() == 5
    for token in (0, 7, torch.tensor(3)):
        assert torch.allclose(c[token].components, full[:, int(token)])
    assert isinstance(c[2], pydec.Composition)
    assert torch.allclose(c.recovery, full.sum(0), atol=1e-5)
    assert torch.equal(c.residual, torch.zeros(11))  # no bias: nothing belongs to no token


def test_bias_share_is_the_residual() -> None:
    """A bias share in the final hidden state is pydec's residual, never a component."""
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(5, 8), torch.randn(11, 8), torch.randn(8)
    c = LogitComposition(hidden, weight, torch.zeros(11), residual=bias)
    assert torch.allclose(c.residual, weight @ bias, atol=1e-5)
    assert torch.allclose(c.components, (hidden @ weight.T), atol=1e-5)
    assert torch.allclose(c.recovery, (hidden.sum(0) + bias) @ weight.T, atol=1e-5)
    assert torch.allclose(c[4].residual, weight[4] @ bias, atol=1e-5)


def test_batched_index_and_fallback_indexing() -> None:
    c = make((3,))
    assert c.shape == (3, 11)
    lazy = c[1, 4].components
    sliced = c[:, 2:4]  # not a single token: falls back to the full Composition
    assert torch.allclose(lazy, c.components[:, 1, 4])
    assert sliced.components.shape == (5, 3, 2)


def test_pydec_operations_work() -> None:
    c = make()
    doubled = c * 2
    assert torch.allclose(doubled.components, 2 * c.components)
    assert "LogitComposition" in repr(c)


def test_the_logprob_readout_is_float64_accurate_over_a_large_vocabulary() -> None:
    """The log-probability target's read-out ``w_t - p @ W`` over SmolLM2's vocabulary size:
    its product with the hidden state equals ``z_t - p . z`` computed in float64 to float32's
    rounding of the result, and so does the value the sum is checked against (a float32
    softmax over 49152 logits sums to 1 + 1e-5 and a float32 ``p @ W`` is off by 1e-4 of
    its largest entry: the target's sum then missed its value by 1.7e-5 of the largest logit)."""
    from llama_attrib.targets import Head, LogProb

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(49152, 576, generator=g) * 0.05
    hidden = torch.randn(576, generator=g) * 3.0
    logits = weight @ hidden
    token = int(logits.argmax())
    z64 = weight.double() @ hidden.double()
    exact = float(z64[token] - torch.softmax(z64, -1) @ z64)
    scale = float(logits.abs().max())
    target = LogProb(token)
    readout = float(target.readout(Head(weight, torch.float32), logits[None])[0].double() @ hidden.double())
    value = float(target.value(logits[None])[0])
    assert abs(readout - exact) <= 1e-6 * scale
    assert abs(value - exact) <= 1e-6 * scale
