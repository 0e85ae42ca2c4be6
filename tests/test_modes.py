"""The modes of issue 6 give the default mode's numbers: target, after the fact, groups,
bounded memory, half precision."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import llama_attrib
from conftest import prompt, tiny_model
from llama_attrib import MemoryBudgetError, decompose_sequence, estimate_memory
from llama_attrib.errors import UnsupportedOptionError
from llama_attrib.targets import Token

GEN = {"return_dict_in_generate": True, "max_new_tokens": 6, "do_sample": False}
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def generated() -> tuple[torch.Tensor, tuple]:
    """A sequence and its streaming forward-mode decomposition (the default of issue 2)."""
    model = llama_attrib.wrap(tiny_model(2))
    out = model.generate(prompt(10), decompose="forward", **GEN)
    return out.sequences, out["attentions"]


@pytest.mark.parametrize(
    ("kv", "rope", "tied"), [(2, "default", False), (1, "llama3", True), (4, "yarn", False)]
)
def test_target_mode_equals_forward_mode_in_generate(kv: int, rope: str, tied: bool) -> None:
    model = llama_attrib.wrap(tiny_model(kv, rope, tied))
    ids = prompt(10)
    forward = model.generate(ids, decompose="forward", **GEN)
    target = model.generate(ids, decompose=True, **GEN)
    assert torch.equal(forward.sequences, target.sequences)
    for k, (f, t) in enumerate(zip(forward["attentions"], target["attentions"], strict=True)):
        assert isinstance(t, llama_attrib.TargetComposition)
        token = int(target.sequences[0, 10 + k])
        assert t.numc() == f.numc() == 10 + k
        assert torch.allclose(t[token].components, f[token].components, **TOL)
        assert torch.allclose(t.recovery, f.recovery, **TOL)
        assert int(f.recovery.argmax(0)) == token  # forward mode's recovery: its components' sum


def test_after_the_fact_equals_generation_in_both_modes(generated: tuple) -> None:
    sequences, reference = generated
    model = tiny_model(2)  # not wrapped: decompose_sequence wraps for the call and unwraps
    for mode in ("target", "forward"):
        steps = decompose_sequence(model, sequences, 10, mode=mode)
        assert not llama_attrib.is_wrapped(model)
        assert len(steps) == len(reference) == 6
        for k, (c, ref) in enumerate(zip(steps, reference, strict=True)):
            token = int(sequences[0, 10 + k])
            assert c.numc() == ref.numc()
            assert torch.allclose(c[token].components, ref[token].components, **TOL)
            assert torch.allclose(c.logits, ref.logits, **TOL)


def test_target_mode_other_tokens_contrasts_and_whole_hidden_state(generated: tuple) -> None:
    sequences, reference = generated
    steps = decompose_sequence(tiny_model(2), sequences, 10)
    c, ref = steps[3], reference[3]
    for token in (0, 5, 95):
        assert torch.allclose(c[token].components, ref[token].components, **TOL)
    contrast = c.contrast(5, 7).components
    assert torch.allclose(contrast, ref[5].components - ref[7].components, **TOL)
    assert torch.allclose(c.hidden, ref.hidden, **TOL)
    assert torch.allclose(c.components, ref.components, atol=1e-4, rtol=1e-4)


def test_explicit_targets_and_contrastive_targets(generated: tuple) -> None:
    sequences, reference = generated
    model = tiny_model(2)
    fixed = decompose_sequence(model, sequences, 10, targets=7)
    per_step = decompose_sequence(model, sequences, 10, targets=[3, 4, 5, 6, 7, 8])
    contrast = decompose_sequence(model, sequences, 10, targets=(7, 9))
    for k, ref in enumerate(reference):
        assert fixed[k].target_key == Token(7)
        assert torch.allclose(fixed[k].target.components, ref[7].components, **TOL)
        assert torch.allclose(per_step[k].target.components, ref[3 + k].components, **TOL)
        expected = ref[7].components - ref[9].components
        assert torch.allclose(contrast[k].target.components, expected, **TOL)
    with pytest.raises(UnsupportedOptionError, match="3 ids for 6 steps"):
        decompose_sequence(model, sequences, 10, targets=[1, 2, 3])


def test_last_position_and_forward_call_in_target_mode() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(9)
    full = model(ids, decompose=True)["attentions"]
    via_call = model(ids, decompose="target")["attentions"]
    via_sequence = decompose_sequence(model, ids)
    assert len(via_sequence) == 1
    pred = int(full.recovery.argmax(0))
    for c in (via_call, via_sequence[0]):
        assert c.target_key == Token(pred)
        assert torch.allclose(c[pred].components, full[pred].components, **TOL)
    with pytest.raises(UnsupportedOptionError, match="decompose must be"):
        model(ids, decompose="backward")


@pytest.mark.parametrize("mode", ["target", "forward"])
def test_groups_sum_their_tokens(generated: tuple, mode: str) -> None:
    sequences, reference = generated
    groups = {"start": (0, 4), "middle": [(4, 6), (8, 10)], "generated": (10, 16)}
    steps = decompose_sequence(tiny_model(2), sequences, 10, groups=groups, mode=mode)
    for k, (c, ref) in enumerate(zip(steps, reference, strict=True)):
        token = int(sequences[0, 10 + k])
        assert c.names == ("start", "middle", "generated", "other")
        assert c.numc() == 4  # cost and size follow the number of groups
        per_token = ref[token].components
        expected = torch.stack(
            [
                per_token[0:4].sum(),
                per_token[4:6].sum() + per_token[8:10].sum(),
                per_token[10:].sum(),
                per_token[6:8].sum(),
            ]
        )
        assert torch.allclose(c[token].components, expected, **TOL)
        assert torch.allclose(c[token].components.sum(), ref.logits[token], **TOL)


def test_groups_from_ids_and_bad_groups(generated: tuple) -> None:
    sequences, _ = generated
    model = tiny_model(2)
    ids = torch.tensor([0] * 5 + [1] * 5 + [2] * 6)
    steps = decompose_sequence(model, sequences, 10, groups=ids)
    assert steps[0].names == ("0", "1", "2")
    with pytest.raises(UnsupportedOptionError, match="overlap"):
        decompose_sequence(model, sequences, 10, groups=[(0, 5), (4, 8)])
    with pytest.raises(UnsupportedOptionError, match="not inside"):
        decompose_sequence(model, sequences, 10, groups=[(0, 50)])


@pytest.mark.parametrize("mode", ["target", "forward"])
def test_small_budget_chunks_the_work_and_gives_the_same_numbers(
    generated: tuple, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sequences, reference = generated
    model = tiny_model(2)
    length = sequences.shape[1] - 1
    if mode == "forward":  # room for 3 components per pass: 5 passes over 15 components
        budget = 3 * estimate_memory(model, length, mode="forward", components=1)
    else:  # the graph plus 2 cotangents per backward: 3 backward passes for 6 steps
        budget = estimate_memory(model, length, mode="target", steps=2)
    from llama_attrib import sweep

    passes: list[int] = []  # forward: one model pass per chunk of components
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: passes.append(1))
    chunks: list[int] = []  # target: cotangent chunks pulled back through the head
    through = sweep.through_one

    def spy(
        session: Any, make_pass: Any, fn: Any, x: Any, cotangents: list[Any], *args: Any, **kw: Any
    ) -> Any:
        chunks.append(len(cotangents))
        return through(session, make_pass, fn, x, cotangents, *args, **kw)

    monkeypatch.setattr(sweep, "through_one", spy)
    try:
        steps = decompose_sequence(model, sequences, 10, mode=mode, max_memory=budget)
        for c in steps:  # target mode solves on first use
            c[int(c.recovery.argmax())]
    finally:
        handle.remove()
    if mode == "forward":
        assert len(passes) >= 5  # 15 components, 3 at a time
    else:  # the head's call of each sweep: its cotangent chunks are the backward passes
        backwards = sum(chunks[:: len(model.model.layers) + 1])
        assert backwards >= 3  # 6 steps, 2 per backward
    for k, (c, ref) in enumerate(zip(steps, reference, strict=True)):
        token = int(sequences[0, 10 + k])
        assert torch.allclose(c[token].components, ref[token].components, **TOL)


@pytest.mark.parametrize("mode", ["target", "forward"])
def test_a_run_that_cannot_fit_is_refused_before_it_starts(generated: tuple, mode: str) -> None:
    sequences, _ = generated
    model = tiny_model(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemoryBudgetError, match="budget is"):
        decompose_sequence(model, sequences, 10, mode=mode, max_memory="1KiB")
    assert not llama_attrib.is_wrapped(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_memory_estimates_grow_as_they_should() -> None:
    model = tiny_model(2)
    assert estimate_memory(model, 200) > estimate_memory(model, 100)
    assert estimate_memory(model, 100, steps=8) > estimate_memory(model, 100, steps=1)
    assert estimate_memory(model, 100, mode="forward") == 100 * estimate_memory(
        model, 100, mode="forward", components=1
    )
    assert estimate_memory(model, 100, mode="generate") > estimate_memory(model, 100, mode="forward")
    assert estimate_memory(model, 100, dtype=torch.bfloat16) < estimate_memory(model, 100)


def test_left_padded_batch_in_target_mode() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    a, b = prompt(9, seed=1)[0], prompt(6, seed=2)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    mask = (torch.arange(9) >= torch.tensor([[0], [3]])).long()
    out = model.generate(ids, attention_mask=mask, decompose=True, pad_token_id=0, **GEN)
    for row, single_ids, pad in ((0, a, 0), (1, b, 3)):
        single = model.generate(single_ids[None], decompose=True, pad_token_id=0, **GEN)
        assert torch.equal(out.sequences[row, pad:], single.sequences[0])
        for k, (c, s) in enumerate(zip(out["attentions"], single["attentions"], strict=True)):
            token = int(out.sequences[row, 9 + k])
            scores = c[row, token].components
            assert torch.equal(scores[:pad], torch.zeros(pad))  # pads contribute exactly 0
            assert torch.allclose(scores[pad:], s[token].components, atol=1e-5, rtol=1e-4)


# bfloat16 measured 3.4e-2 since the probabilities come from the stock attention's own
# bfloat16 queries and keys (before: a float32 recomputation, 2.6e-2).
@pytest.mark.parametrize(("dtype", "bound"), [(torch.float16, 6e-3), (torch.bfloat16, 4e-2)])
def test_half_precision_components(dtype: torch.dtype, bound: float) -> None:
    """component_dtype=half runs the pass in half precision; float32 (default) accumulates."""
    model = llama_attrib.wrap(tiny_model(2, dtype=dtype))
    out = model.generate(prompt(9), output_scores=True, **GEN)
    for component_dtype in (dtype, torch.float32):
        steps = decompose_sequence(model, out.sequences, 9, component_dtype=component_dtype)
        for k, (c, scores) in enumerate(zip(steps, out.scores, strict=True)):
            token = int(out.sequences[0, 9 + k])
            contributions = c[token].components
            assert contributions.dtype == component_dtype
            real = scores[0].float()
            err = abs(float(contributions.float().sum() - real[token])) / float(real.abs().max())
            assert err <= bound


def test_progress_bar_when_asked(generated: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    sequences, _ = generated
    decompose_sequence(tiny_model(2), sequences, 10, mode="forward", progress=True)
    assert "llama_attrib" in capsys.readouterr().err
    decompose_sequence(tiny_model(2), sequences, 10, progress=False)
    assert capsys.readouterr().err == ""


def test_generate_options_of_target_mode_are_checked() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    out = model.generate(prompt(9), decompose=True, component_dtype=torch.float64, **GEN)
    assert out["attentions"][0].dtype == torch.float64
    with pytest.raises(UnsupportedOptionError, match="apply to target mode"):
        model.generate(prompt(9), decompose="forward", component_dtype=torch.float64, **GEN)


def test_forward_mode_refuses_what_cannot_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama_attrib.wrap(tiny_model(2))
    with pytest.raises(MemoryBudgetError, match="decompose=True"):
        model.generate(prompt(9), decompose="forward", max_memory="1KiB", **GEN)
    monkeypatch.setattr(llama_attrib.memory, "available", lambda device: 1000)
    with pytest.raises(MemoryBudgetError, match="mode='forward'"):
        model(prompt(9), decompose=True)
    monkeypatch.undo()
    out = model.generate(prompt(9), decompose="forward", max_memory="1GB", **GEN)  # fits
    assert len(out["attentions"]) == 6


def test_the_estimate_is_what_the_run_plans_and_fits_its_own_budget(generated: tuple) -> None:
    """estimate_memory(steps=n) is the peak of the chunking a default run uses; a budget of that
    size is never refused and chunks the targets the same way."""
    from llama_attrib import memory

    sequences, reference = generated
    model = tiny_model(2)
    length, n = sequences.shape[1] - 1, len(reference)
    sizes = memory.TargetSizes.of(memory.Shape.of(model), 1, length, torch.float32)
    estimate = estimate_memory(model, length, steps=n)
    assert estimate == sizes.peak(n) == sizes.graph + n * sizes.state + sizes.chunks(n)[0] * sizes.work
    assert sizes.chunks(n, estimate, unbudgeted=False) == sizes.chunks(n)
    steps = decompose_sequence(model, sequences, 10, max_memory=estimate)
    for k, (c, ref) in enumerate(zip(steps, reference, strict=True)):
        token = int(sequences[0, 10 + k])
        assert torch.allclose(c[token].components, ref[token].components, **TOL)
    # refused below the smallest probability blocks' need for one target (nothing kept)
    smallest = memory.target_layouts(
        memory.Shape.of(model), 1, length, torch.float32, torch.device("cpu"), torch.float32
    )[-1][0]
    with pytest.raises(MemoryBudgetError):
        decompose_sequence(model, sequences, 10, max_memory=smallest.graph + smallest.per_request - 1)
