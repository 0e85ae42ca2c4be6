"""Targets (:mod:`llama_attrib.targets`): every kind gives, in both modes, the same components
as the token logits it is made of; a target defined outside the package runs through every
engine; the log-probability target is refused under a final soft-cap in both modes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

import llama_attrib
from conftest import prompt, tiny_model
from llama_attrib.errors import UnsupportedOptionError
from llama_attrib.targets import Contrast, Head, LogProb, Target, Token, Vector, per_step
from test_families import family_model

MODES = ["target", "forward"]


@dataclasses.dataclass(frozen=True)
class Both(Target):
    """A kind the package does not have: the sum of two tokens' logits, one pair per row."""

    a: tuple[int, ...]
    b: tuple[int, ...]

    def readout(self, head: Head, logits: Tensor) -> Tensor:
        return head.rows(self.a) + head.rows(self.b)

    def value(self, logits: Tensor) -> Tensor:
        rows = torch.arange(len(self.a))
        return logits[rows, list(self.a)] + logits[rows, list(self.b)]


def _scale(c: object) -> float:
    return float(c.logits.abs().max())  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", MODES)
def test_each_kind_is_made_of_the_token_logits(mode: str) -> None:
    """Contrast = c[a] - c[b]; LogProb = c[t] - sum_j p_j c[j] over the whole vocabulary (the
    probabilities from the stock logits); a Vector along a head row = c[t]; each one's sum is
    its value in the logits."""
    model = tiny_model()
    ids = prompt(9)
    (c,) = llama_attrib.decompose_sequence(model, ids, mode=mode)
    scale = _scale(c)
    a, b = 5, 17
    contrast = c.explain(Contrast(a, b))
    assert torch.allclose(contrast.components, c[a].components - c[b].components, atol=1e-5 * scale, rtol=0)
    assert abs(float(contrast.components.sum() + contrast.residual) - float(c.logits[a] - c.logits[b])) <= (
        1e-5 * scale
    )
    p = torch.softmax(c.logits.double(), -1)
    every = torch.stack([c[t].components for t in range(p.shape[0])]).double()  # [vocab, C]
    expected = c[a].components.double() - p @ every
    got = c.explain(LogProb(a))
    assert torch.allclose(got.components.double(), expected, atol=1e-5 * scale, rtol=0)
    value = float(LogProb(a).value(c.logits[None])[0])
    assert abs(value - float(torch.log_softmax(c.logits.double(), -1)[a] - (p * p.log()).sum())) < 1e-4
    assert abs(float(got.components.sum() + got.residual) - value) <= 1e-5 * scale
    assert torch.equal(c.logprob(a).components, got.components) and torch.equal(
        c.contrast(a, b).components, contrast.components
    )
    if mode == "target":  # a Vector is what c.hidden is made of
        weight = model.lm_head.weight.detach()
        along = c._run.solve([(0, Vector(weight[a][None]))])[0, 0, : c.numc()]
        assert torch.allclose(along, c[a].components, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_target_defined_outside_the_package_runs_through_the_engines(mode: str) -> None:
    """``Both`` (a Target subclass in this file) as decompose_sequence's targets, each step's,
    then through c.explain and flow: its components are c[a] + c[b], its sum the sum of the
    two logits; decompose_answer sums it over the steps."""
    model = tiny_model()
    ids = prompt(11)
    steps = llama_attrib.decompose_sequence(model, ids, 8, mode=mode, targets=[Both((3,), (9,))] * 3)
    for c in steps:
        scale = _scale(c)
        got = c.explain(Both((3,), (9,)))
        want = c[3].components + c[9].components
        assert torch.allclose(got.components, want, atol=1e-5 * scale, rtol=0)
        assert (
            abs(float(got.components.sum() + got.residual) - float(c.logits[3] + c.logits[9])) <= 1e-5 * scale
        )
        if mode == "target":
            assert c.target_key == Both((3,), (9,))
            assert torch.equal(c.target.components, got.components)  # solved with the pass, not again
    answer = llama_attrib.decompose_answer(model, ids, 8, targets=[Both((3,), (9,))] * 3)
    summed = sum(
        torch.nn.functional.pad(c.explain(Both((3,), (9,))).components, (0, 2 - k))
        for k, c in enumerate(steps)
    )
    assert torch.allclose(answer.components, summed, atol=1e-4, rtol=0)
    if mode == "forward":
        flow = llama_attrib.flow(model, ids[0, :8], target=Both((3,), (9,)))
        assert abs(flow.logit - float(steps[0].logits[3] + steps[0].logits[9])) <= 1e-5 * _scale(steps[0])


def test_flow_explains_the_log_probability_target() -> None:
    """flow(target=LogProb(t)): its paths add up to the value, and its per-source sums are the
    target-mode components of the same target."""
    model = tiny_model()
    ids = prompt(8)
    (c,) = llama_attrib.decompose_sequence(model, ids)
    result = llama_attrib.flow(model, ids, target=LogProb(7))
    want = c.logprob(7)
    assert abs(result.logit - float(LogProb(7).value(c.logits[None])[0])) <= 1e-5 * _scale(c)
    per_source = result.scores.sum((1, 2)) + result.embedding
    assert torch.allclose(per_source, want.components, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_the_log_probability_target_is_refused_under_a_final_soft_cap(mode: str) -> None:
    """Gemma 2's final soft-cap makes the log-probability target non-linear: both modes refuse
    it (forward mode did not before the targets had one home), and the logit still works."""
    model = family_model("gemma2")
    ids = prompt(9)
    (c,) = llama_attrib.decompose_sequence(model, ids, mode=mode)
    token = int(c.logits.argmax())
    with pytest.raises(UnsupportedOptionError, match="soft-cap"):
        c.logprob(token)
    with pytest.raises(UnsupportedOptionError, match="soft-cap"):
        llama_attrib.decompose_sequence(model, ids, 8, mode=mode, targets="logprob")[0].logprob(token)
    assert c[token].components.shape == (9,)
    with pytest.raises(UnsupportedOptionError, match="soft-cap"):
        llama_attrib.flow(model, ids, target=LogProb(token))


def test_targets_have_rows_and_keys() -> None:
    """One id is one row; row() and broadcast() keep the kind; equal targets are one key."""
    t = Token((4, 6))
    assert t.rows == 2 and t.row(1) == Token(6) and hash(t.row(1)) == hash(Token(6))
    assert Token(4).broadcast(3) == Token((4, 4, 4)) and Contrast(1, (2, 3)) == Contrast((1, 1), (2, 3))
    assert LogProb(torch.tensor([1, 2])).row(0) == LogProb(1) and LogProb(1) != Token(1)
    with pytest.raises(UnsupportedOptionError, match="rows"):
        t.broadcast(3)
    with pytest.raises(UnsupportedOptionError, match="no value"):
        Vector(torch.ones(1, 4)).value(torch.ones(1, 9))
    steps = per_step("logprob", torch.tensor([[1, 2]]), 2, 1)
    assert steps == [LogProb(1), LogProb(2)]
    assert per_step((5, torch.tensor([6, 7])), None, 2, 1) == [Contrast(5, 6), Contrast(5, 7)]
    assert per_step(Token(3), None, 2, 2) == [Token((3, 3))] * 2
    with pytest.raises(UnsupportedOptionError, match="2 targets for 3 steps"):
        per_step([Token(1), Token(2)], None, 3, 1)
    with pytest.raises(UnsupportedOptionError, match="'logprob'"):
        per_step("entropy", None, 1, 1)
