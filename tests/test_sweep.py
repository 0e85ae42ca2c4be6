"""Target mode in bounded memory: the probabilities in blocks of queries, recomputed in the
backward, the MLP in pieces of positions, targets in several batched backwards and sweeps.
Every way of cutting the work gives the numbers of the uncut computation (float32, 1e-5 of
the largest logit)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import llama_attrib
from conftest import prompt, tiny_model
from llama_attrib import engines, memory, rules
from test_families import family_model

STEPS = 4


def _all(model: nn.Module, ids: torch.Tensor, prompt_length: int, **kwargs: Any) -> list[torch.Tensor]:
    """Every step's components and bias share for its generated token and for token 5."""
    out = []
    for k, c in enumerate(llama_attrib.decompose_sequence(model, ids, prompt_length, **kwargs)):
        for token in (int(ids[0, prompt_length + k]), 5):
            got = c[token]
            out.append(torch.cat([got.components.reshape(-1), got.residual.reshape(-1)]))
    return out


def _uncut(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole probability matrix of a layer in one block, kept for the backward; the MLP
    over every position at once."""
    monkeypatch.setattr(rules.scores, "BLOCK_BYTES", 1 << 40)
    monkeypatch.setattr(rules.scores, "KEEP_BYTES", 1 << 40)
    monkeypatch.setattr(rules.mlp, "ROWS", 1 << 30)


def _uncut_reference(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A greedy generation of STEPS tokens after an 11-token prompt, and its components computed uncut."""
    sequences = model.generate(prompt(11), max_new_tokens=STEPS, do_sample=False)
    with monkeypatch.context() as m:
        _uncut(m)
        return sequences, _all(model, sequences, 11)


def _blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules.scores, "BLOCK_BYTES", 64)  # a row or two of queries per block
    monkeypatch.setattr(rules.scores, "KEEP_BYTES", 1 << 40)


def _recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules.scores, "BLOCK_BYTES", 256)
    monkeypatch.setattr(rules.scores, "KEEP_BYTES", 0)  # every block computed again in the backward


def _pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules.mlp, "ROWS", 4)  # the MLP over 4 positions at a time


def _chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    # one target per batched backward, three per sweep (several sweeps over the layers)
    monkeypatch.setattr(engines.TargetRun, "chunks", lambda self, n: (1, 3))


WAYS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "blocks": _blocks,
    "recomputed": _recomputed,
    "pieces": _pieces,
    "chunked": _chunked,
}


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "qwen2"])
def test_cut_work_equals_the_uncut_computation(name: str, way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model() if name == "llama" else family_model(name)
    sequences, expected = _uncut_reference(model, monkeypatch)
    with monkeypatch.context() as m:
        WAYS[way](m)
        got = _all(model, sequences, 11)
    scale = max(float(e.abs().max()) for e in expected)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, atol=1e-5 * scale, rtol=0), (name, way, float((e - g).abs().max()))


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_cut_work_under_attnlrp_equals_the_uncut_computation(
    name: str, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same under the rule set that credits queries and keys (its own backward kernel,
    whose blocks reuse one buffer of every target's dP; Gemma 2: soft-caps, sliding windows)."""
    model = tiny_model() if name == "llama" else family_model(name)
    sequences = model.generate(prompt(11), max_new_tokens=STEPS, do_sample=False)
    with monkeypatch.context() as m:
        _uncut(m)
        expected = _all(model, sequences, 11, rules="attnlrp")
    with monkeypatch.context() as m:
        WAYS[way](m)
        got = _all(model, sequences, 11, rules="attnlrp")
    scale = max(float(e.abs().max()) for e in expected)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, atol=1e-5 * scale, rtol=0), (name, way, float((e - g).abs().max()))


def test_attnlrp_batches_fewer_targets_per_backward_at_long_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule set that credits queries and keys needs about twice the working memory per
    target: without a budget its targets go through in smaller batches at a long prompt
    (SmolLM2's shape at 8000 tokens: 2 per backward, where the exact rules take all 8), and
    runs and estimates plan with those sizes."""
    smollm2 = memory.Shape(layers=30, hidden=576, heads=9, kv_dim=192, intermediate=1536, vocab=49152)
    cpu = torch.device("cpu")
    exact = memory.TargetSizes.of(smollm2, 1, 8008, torch.float32, cpu)
    credited = memory.TargetSizes.of(
        smollm2, 1, 8008, torch.float32, cpu, factor=rules.ATTNLRP.attention.work
    )
    assert credited.work == 2 * exact.work and credited.graph == exact.graph
    assert exact.chunks(8) == (8, 8) and credited.chunks(8) == (2, 8)
    assert credited.peak(8) < exact.peak(8)
    short = memory.TargetSizes.of(smollm2, 1, 280, torch.float32, cpu, factor=2)
    assert short.chunks(32)[0] > 2  # a short prompt's targets still go in larger batches
    model = tiny_model()
    shape = memory.Shape.of(model)
    for name, factor in (("exact", 1), ("attnlrp", 2)):
        sizes = memory.TargetSizes.of(shape, 1, 40, torch.float32, cpu, factor=factor)
        assert llama_attrib.estimate_memory(model, 40, steps=8, rules=name) == sizes.peak(8)
    planned: list[bool] = []
    layouts = memory.target_layouts

    def spy(*args: Any, **kwargs: Any) -> Any:
        planned.append(kwargs.get("factor", 1) > 1)
        return layouts(*args, **kwargs)

    monkeypatch.setattr(memory, "target_layouts", spy)
    llama_attrib.decompose_sequence(model, prompt(9), 7, rules="attnlrp")
    llama_attrib.decompose_sequence(model, prompt(9), 7)
    assert planned == [True, False]


@pytest.mark.parametrize("ruleset", sorted(rules.RULE_SETS))
def test_left_padded_batch_in_blocks(ruleset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A padding mask cut into blocks, under every rule set: each row equals that row
    decomposed alone, its components and each share of no token (attnlrp-path's uniform
    attention divided 0 by 0 on a padding row, which sees no key)."""
    model = tiny_model()
    ids = prompt(9, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    _recomputed(monkeypatch)
    batch = llama_attrib.decompose_sequence(model, ids, 7, attention_mask=mask, rules=ruleset)
    alone = llama_attrib.decompose_sequence(model, ids[1:, 3:], 4, rules=ruleset)
    for c, a in zip(batch, alone, strict=True):
        token = int(a.recovery.argmax())
        got, want = c[1, token], a[token]
        scale = float(a.recovery.abs().max())
        assert torch.allclose(got.components[3:], want.components, atol=1e-5 * scale, rtol=0)
        assert not got.components[:3].any()  # the padding positions
        for name, share in want.shares.items():
            assert abs(float(got.shares[name]) - float(share)) <= 1e-5 * scale, name


def test_probability_rows_equal_the_whole_matrix() -> None:
    """FrozenProbabilities.rows over a block and the keys it sees equals that part of the whole matrix,
    and the keys left out have probability exactly zero."""
    torch.manual_seed(0)
    query, key = torch.randn(2, 4, 13, 8), torch.randn(2, 2, 13, 8)
    for mask in (None, torch.rand(2, 1, 13, 13) > 0.3):
        if mask is not None:
            mask = mask & torch.ones(13, 13, dtype=torch.bool).tril()
            mask[..., 0] = True
        scores = rules.FrozenProbabilities(query, key, mask, 0.35, None)
        whole = scores.rows()
        for a, b, k in [(0, 3, scores.extent(0, 3)), (5, 9, scores.extent(5, 9)), (12, 13, 13)]:
            assert torch.allclose(scores.rows(a, b, k), whole[..., a:b, :k], atol=1e-6)
            assert not whole[..., a:b, k:].any()


def test_the_sweep_leaves_no_hook_even_when_a_layer_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    ids = prompt(7)
    llama_attrib.decompose_sequence(model, ids, 6)
    modules = [*model.model.layers, model.model.norm]
    assert all(not m._forward_pre_hooks for m in modules)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("layer failed")

    monkeypatch.setattr(model.model.layers[1], "forward", broken)
    with pytest.raises(RuntimeError, match="layer failed"):
        llama_attrib.decompose_sequence(model, ids, 6)
    assert all(not m._forward_pre_hooks for m in modules)
    assert not llama_attrib.is_wrapped(model)


def test_blocks_of_probabilities_are_larger_on_an_accelerator() -> None:
    """On a GPU small blocks cost kernel launches, not bytes: a 32-head layer at 32k keys gets
    8 query rows per block on the CPU (32 MiB) and 256 elsewhere (1 GiB)."""
    for device, rows in (("cpu", 8), ("meta", 256)):
        query = torch.empty(1, 32, 32768, 4, device=device)
        key = torch.empty(1, 8, 32768, 4, device=device)
        blocks = rules.FrozenProbabilities(query, key, None, 0.5, None).blocks(0, 32768)
        assert [b - a for a, b, _ in blocks] == [rows] * (32768 // rows)
        assert [k for _, b, k in blocks] == [b for _, b, _ in blocks]  # causal: keys up to the row


def test_estimate_counts_the_kept_layer_inputs_at_the_models_width() -> None:
    """A half-precision model's layer inputs are kept as it computed them (2 bytes each), while
    the components run in float32: the estimates differ by exactly those inputs."""
    model = tiny_model()
    length, hidden, layers = 100, model.config.hidden_size, model.config.num_hidden_layers
    full = llama_attrib.estimate_memory(model, length)
    half = llama_attrib.estimate_memory(tiny_model(dtype=torch.bfloat16), length)
    inputs = (layers + 1) * length * hidden * 2
    assert full - half == pytest.approx(memory.SLACK * inputs, abs=4)


def test_a_gpu_budget_counts_the_allocators_cached_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a long run PyTorch keeps its freed blocks; the driver reports them as used. The
    next run may still use them (the H200 run at 32k split into two sweeps without this)."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * gib)
    assert memory.available(torch.device("cuda")) == 110 * gib
    assert memory.budget(None, torch.device("cuda")) == int(110 * gib * 0.8)


def test_a_tight_budget_gets_smaller_blocks_not_more_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a budget the default blocks would fill, the probabilities come in smaller blocks,
    none kept for the backward, so that the targets need fewer sweeps over the layers; the
    components are those of the uncut computation. Below the smallest blocks' need: refused."""
    model = tiny_model()
    sequences, expected = _uncut_reference(model, monkeypatch)
    monkeypatch.setattr(rules.scores, "BLOCK_BYTES", 4096)  # a whole layer's probabilities are ~4 KiB
    monkeypatch.setattr(rules, "MIN_BLOCK_BYTES", 256)
    length = sequences.shape[1] - 1
    shape, cpu = memory.Shape.of(model), torch.device("cpu")
    layouts = memory.target_layouts(shape, 1, length, torch.float32, cpu, torch.float32)
    assert [p for _, p in layouts] == [None, (4096, 0), (2048, 0), (1024, 0), (512, 0), (256, 0)]
    default, small = layouts[0][0], layouts[-1][0]
    assert small.graph < default.graph
    budget = small.graph + STEPS * small.state + small.work  # all targets in one sweep, if small
    assert default.chunks(STEPS, budget, unbudgeted=False)[1] < STEPS  # the default needs two sweeps
    seen: dict[int, set[tuple[int | None, int | None]]] = {}  # targets in a solve -> blocks seen
    solving = [0]
    blocks, solve = rules.FrozenProbabilities.blocks, engines.TargetRun.solve

    def spy_blocks(self: rules.FrozenProbabilities, t0: int, t1: int) -> list[tuple[int, int, int]]:
        seen.setdefault(solving[0], set()).add((self.block, self.keep))
        return blocks(self, t0, t1)

    def spy_solve(self: engines.TargetRun, requests: Any) -> torch.Tensor:
        solving[0] = len(requests)
        return solve(self, requests)

    monkeypatch.setattr(rules.FrozenProbabilities, "blocks", spy_blocks)
    monkeypatch.setattr(engines.TargetRun, "solve", spy_solve)
    got = _all(model, sequences, 11, max_memory=budget)
    # the steps' targets together: the smallest blocks, nothing kept; one more token (token 5
    # of a step) alone: the largest blocks that fit it
    alone = next(p for sizes, p in layouts if sizes.graph + sizes.per_request <= budget)
    assert alone != (256, 0)
    assert seen == {STEPS: {(256, 0)}, 1: {alone or (None, None)}}
    scale = max(float(e.abs().max()) for e in expected)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, atol=1e-5 * scale, rtol=0)
    seen.clear()
    _all(model, sequences, 11)  # no budget: the default blocks
    assert seen == {STEPS: {(None, None)}, 1: {(None, None)}}
    with pytest.raises(llama_attrib.MemoryBudgetError, match="for one target"):
        llama_attrib.decompose_sequence(model, sequences, 11, max_memory=small.graph + small.per_request - 1)


def _mlp_calls(model: nn.Module, run: Callable[[], Any]) -> int:
    """How many times the first layer's MLP ran during ``run()``."""
    calls = [0]
    handle = model.model.layers[0].mlp.register_forward_pre_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1)
    )
    try:
        run()
    finally:
        handle.remove()
    return calls[0]


def test_generate_hands_its_hidden_states_to_the_pass() -> None:
    """generate(decompose=True) keeps what enters each layer while it generates: the pass then
    runs every layer once (its graph), not twice (a stock forward of the whole sequence first).
    The components equal decompose_sequence's, which records its own stock forward."""
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(9)
    out: dict[str, Any] = {}

    def generate() -> None:
        out.update(model.generate(ids, decompose=True, max_new_tokens=STEPS, do_sample=False, pad_token_id=0))

    assert _mlp_calls(model, generate) == STEPS + 1  # the prompt, 3 new tokens with the cache, the graph
    assert out.get("cache") is None and out.get("past_key_values") is None  # dropped: it explains nothing
    recorded = llama_attrib.decompose_sequence(model, out["sequences"], 9)
    assert _mlp_calls(model, lambda: llama_attrib.decompose_sequence(model, out["sequences"], 9)) == 2
    for k, (c, r) in enumerate(zip(out["attentions"], recorded, strict=True)):
        token = int(out["sequences"][0, 9 + k])
        scale = float(r.recovery.abs().max())
        assert torch.allclose(c[token].components, r[token].components, atol=1e-5 * scale, rtol=0)
        assert torch.allclose(c[token].residual, r[token].residual, atol=1e-5 * scale, rtol=0)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.model.layers)
    assert all("forward" not in m.__dict__ for m in model.model.layers)


def test_a_model_that_changes_the_hidden_state_between_layers_is_recorded_again() -> None:
    """When a layer's output is not, as it is, the next layer's input (here a hook of the
    user's scales it: it would run again on a replayed output), the generated hidden states are
    not replayed: the pass records its own forward."""
    model = llama_attrib.wrap(tiny_model(2))
    model.model.layers[0].register_forward_hook(lambda module, args, output: output * 1.5)
    ids = prompt(9)
    out: dict[str, Any] = {}

    def generate() -> None:
        out.update(model.generate(ids, decompose=True, max_new_tokens=STEPS, do_sample=False, pad_token_id=0))

    assert _mlp_calls(model, generate) == STEPS + 2
    for k, c in enumerate(out["attentions"]):
        token = int(out["sequences"][0, 9 + k])
        assert torch.allclose(c[token].components.sum() + c[token].residual, c.logits[token], atol=1e-5)


def test_the_stock_attention_output_is_the_forward_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a layer's probabilities are not kept, the forward takes the stock implementation's
    output as the value of the frozen mix (no probabilities computed until the backward)."""
    model = tiny_model()
    sequences, expected = _uncut_reference(model, monkeypatch)
    monkeypatch.setattr(rules.scores, "KEEP_BYTES", 0)
    rows, grad = [0, 0], torch.is_grad_enabled
    original = rules.FrozenProbabilities.rows

    def counted(self: rules.FrozenProbabilities, *args: Any) -> torch.Tensor:
        rows[grad()] += 1  # the backward computes with grad mode off
        return original(self, *args)

    monkeypatch.setattr(rules.FrozenProbabilities, "rows", counted)
    got = _all(model, sequences, 11)
    assert rows[1] == 0 and rows[0] > 0
    scale = max(float(e.abs().max()) for e in expected)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, atol=1e-5 * scale, rtol=0)
