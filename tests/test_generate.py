"""Decomposed generation: same tokens as plain generation, cached = uncached, sampling."""

from __future__ import annotations

import logging

import pytest
import torch

import llama_attrib
from conftest import prompt, tiny_model
from llama_attrib import engines

GEN = {"return_dict_in_generate": True, "output_attentions": True, "max_new_tokens": 8}


@pytest.mark.parametrize("mode", ["target", "forward"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tokens_identical_to_plain_generate(attn: str, mode: str) -> None:
    model = tiny_model(2, attn=attn)
    ids = prompt(11)
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    llama_attrib.wrap(model)
    out = model.generate(ids, decompose=mode, use_cache=True, do_sample=False, **GEN)
    assert torch.equal(out.sequences, plain)


def test_cached_equals_uncached() -> None:
    """Forward mode decomposes inside generate: with the cache it reads the decomposed value
    cache, without it recomputes the whole prefix each step. Same numbers."""
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(10)
    cached = model.generate(ids, decompose="forward", use_cache=True, do_sample=False, **GEN)
    uncached = model.generate(ids, decompose="forward", use_cache=False, do_sample=False, **GEN)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached["attentions"], uncached["attentions"], strict=True):
        assert torch.allclose(a.components, b.components, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["target", "forward"])
def test_eager_and_sdpa_give_the_same_numbers(mode: str) -> None:
    ids = prompt(10)
    outs = [
        llama_attrib.wrap(tiny_model(2, attn=attn)).generate(ids, decompose=mode, do_sample=False, **GEN)
        for attn in ("eager", "sdpa")
    ]
    for a, b in zip(outs[0]["attentions"], outs[1]["attentions"], strict=True):
        assert torch.allclose(a.components, b.components, atol=1e-5, rtol=1e-5)


def test_sampling_same_tokens_and_decomposes_the_sampled_token() -> None:
    model = tiny_model(2)
    ids = prompt(8)
    options = {"do_sample": True, "temperature": 1.5, "top_k": 0, "max_new_tokens": 8}
    torch.manual_seed(7)
    plain = model.generate(ids, **options)
    llama_attrib.wrap(model)
    torch.manual_seed(7)
    out = model.generate(ids, decompose=True, return_dict_in_generate=True, **options)
    assert torch.equal(out.sequences, plain)
    for k, c in enumerate(out["attentions"]):
        token = int(out.sequences[0, 8 + k])  # the sampled token, not necessarily the argmax
        scores = c[token].components
        assert scores.shape == (8 + k,)
        assert torch.allclose(scores.sum(), c.logits[token], atol=1e-5, rtol=1e-5)


def test_decompose_block_needs_no_extra_argument() -> None:
    model = tiny_model(2)
    ids = prompt(6)
    with llama_attrib.decompose(model):
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        forward = model(ids)
    assert len(out["attentions"]) == 3
    assert isinstance(forward["attentions"], llama_attrib.LogitComposition)
    assert not llama_attrib.is_wrapped(model)


def test_seed_loop_runs_as_written() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(6)
    out = model.generate(ids, decompose=True, use_cache=True, do_sample=False, **GEN)
    rows = []
    for c in out["attentions"]:
        pred = c.recovery.argmax(dim=0)
        for i, score in enumerate(c[pred].components):
            rows.append((int(pred), i, float(score)))
    assert len(rows) == sum(6 + k for k in range(8))


def test_seed_loop_after_a_logits_processor_costs_no_second_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a processor made generate pick another token than the highest logit, the
    seed's loop asks for the highest one: solved with the generated tokens, in one pass,
    and equal to what a separate pass gives."""
    model = tiny_model(2)
    ids = prompt(6)
    first = int(model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, 6])
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "suppress_tokens": [first]}
    plain = model.generate(ids, **options)
    llama_attrib.wrap(model)
    solves = []
    solve = engines.TargetRun.solve
    monkeypatch.setattr(
        engines.TargetRun,
        "solve",
        lambda run, requests: solves.append(len(requests)) or solve(run, requests),
    )
    out = model.generate(ids, decompose=True, return_dict_in_generate=True, **options)
    assert torch.equal(out.sequences, plain)
    steps = out["attentions"]
    assert int(steps[0].recovery.argmax(0)) == first != int(plain[0, 6])  # the processor changed step 0
    seed = [c[c.recovery.argmax(0)].components for c in steps]
    assert solves == [4 + 1]  # the four generated tokens and step 0's highest logit, one pass
    again = llama_attrib.decompose_sequence(model, plain, 6)[0][first]
    assert torch.allclose(seed[0], again.components, atol=1e-5, rtol=0)
    assert torch.allclose(seed[0].sum() + steps[0][first].residual, steps[0].logits[first], atol=1e-5)


def test_batch_rows_match_single_runs() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(7, batch=2, seed=3)
    out = model(ids, decompose=True)
    c = out["attentions"]
    assert c.shape == (2, 96)
    for row in range(2):
        single = model(ids[row : row + 1], decompose=True)["attentions"]
        token = int(single.recovery.argmax(0))
        assert torch.allclose(c[row, token].components, single[token].components, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_beams": 2}, "beam search"),
        ({"assistant_model": object()}, "assisted generation"),
        ({"cache_implementation": "static"}, "cache_implementation"),
    ],
)
def test_unsupported_generation_options_are_refused_in_forward_mode(options: dict, message: str) -> None:
    model = llama_attrib.wrap(tiny_model(2))
    with pytest.raises(llama_attrib.UnsupportedOptionError, match=message):
        model.generate(prompt(5), decompose="forward", max_new_tokens=2, **options)


def _check_rows_against_single_runs(model: torch.nn.Module, out: object, prompt_length: int) -> None:
    """Every returned sequence's steps equal that sequence decomposed alone, and sum to the logit."""
    sequences = out.sequences  # type: ignore[attr-defined]
    for row in range(sequences.shape[0]):
        alone = llama_attrib.decompose_sequence(model, sequences[row], prompt_length)
        for k, (c, single) in enumerate(zip(out["attentions"], alone, strict=True)):  # type: ignore[index]
            token = int(sequences[row, prompt_length + k])
            scores = c[row, token].components if sequences.shape[0] > 1 else c[token].components
            assert torch.allclose(scores, single[token].components, atol=1e-5, rtol=1e-5)
            assert torch.allclose(scores.sum(), single.logits[token], atol=1e-5, rtol=1e-5)


def test_beam_search_and_several_returned_sequences() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(7)
    options = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5, "do_sample": False}
    plain = model.generate(ids, **options)
    out = model.generate(ids, decompose=True, return_dict_in_generate=True, **options)
    assert torch.equal(out.sequences, plain)
    assert out["attentions"][0].shape == (2, 96)
    _check_rows_against_single_runs(model, out, 7)


def test_sampling_several_sequences_of_a_padded_batch() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = torch.cat(
        [prompt(6, seed=3), torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt(4, seed=4)], 1)]
    )
    mask = (ids != 0).long()
    options = {"num_return_sequences": 2, "max_new_tokens": 4, "do_sample": True, "pad_token_id": 0}
    torch.manual_seed(3)
    out = model.generate(ids, attention_mask=mask, decompose=True, return_dict_in_generate=True, **options)
    assert out.sequences.shape[0] == 4
    for k, c in enumerate(out["attentions"]):
        for row in range(4):
            token = int(out.sequences[row, 6 + k])
            scores = c[row, token].components
            assert torch.allclose(scores.sum(), c.logits[row, token], atol=1e-5, rtol=1e-5)
            if row >= 2:  # the padded prompt's rows: the pads contribute exactly 0
                assert torch.equal(scores[:2], torch.zeros(2))


@pytest.mark.parametrize(
    "options", [{"cache_implementation": "static"}, {"prompt_lookup_num_tokens": 2}], ids=["static", "lookup"]
)
def test_other_decoding_strategies_give_the_greedy_decomposition(options: dict) -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = torch.cat([prompt(8), prompt(8)[:, 1:5]], 1)  # repeats, so prompt lookup finds candidates
    greedy = model.generate(
        ids, decompose=True, return_dict_in_generate=True, max_new_tokens=5, do_sample=False
    )
    other = model.generate(
        ids, decompose=True, return_dict_in_generate=True, max_new_tokens=5, do_sample=False, **options
    )
    assert torch.equal(other.sequences, greedy.sequences)
    for k, (a, b) in enumerate(zip(greedy["attentions"], other["attentions"], strict=True)):
        token = int(greedy.sequences[0, 12 + k])
        assert torch.allclose(a[token].components, b[token].components, atol=1e-5, rtol=1e-5)


def test_return_dict_in_generate_false_is_refused() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="return_dict_in_generate=True"):
        model.generate(prompt(5), decompose=True, max_new_tokens=2, return_dict_in_generate=False)


def test_cache_from_a_plain_call_is_refused() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(6)
    plain = model(ids, use_cache=True)
    with pytest.raises(llama_attrib.DecompositionError, match="not decomposed"):
        model(ids[:, -1:], past_key_values=plain.past_key_values, decompose=True)


def test_forward_with_cache_continues_a_decomposed_forward() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(8)
    first = model(ids[:, :6], use_cache=True, decompose=True)
    step = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True, decompose=True)
    whole = model(ids, decompose=True)["attentions"]
    assert step["attentions"].numc() == 8
    assert torch.allclose(step["attentions"].components, whole.components, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_rows_match_single_runs(attn: str) -> None:
    model = llama_attrib.wrap(tiny_model(2, attn=attn))
    long, short = prompt(7, seed=1), prompt(4, seed=2)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    options = {"decompose": True, "return_dict_in_generate": True, "max_new_tokens": 4, "do_sample": False}
    out = model.generate(ids, attention_mask=mask, pad_token_id=0, **options)
    alone = model.generate(short, **options)
    assert torch.equal(out.sequences[1, 7:], alone.sequences[0, 4:])
    for k, (c, single) in enumerate(zip(out["attentions"], alone["attentions"], strict=True)):
        token = int(alone.sequences[0, 4 + k])
        row = c[1, token].components
        assert torch.equal(row[:3], torch.zeros(3))  # padding contributes exactly nothing
        assert torch.allclose(row[3:], single[token].components, atol=1e-5)


def test_hidden_states_come_back_as_plain_tensors() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(6)
    out = model(ids, decompose=True, output_hidden_states=True)
    plain = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(plain.hidden_states)
    for a, b in zip(out.hidden_states, plain.hidden_states, strict=True):
        assert type(a) is torch.Tensor and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["forward", "target"])
def test_right_padded_batch_explains_each_rows_last_real_token(mode: str) -> None:
    model = llama_attrib.wrap(tiny_model(2))
    a, b = prompt(9, seed=5)[0], prompt(5, seed=6)[0]
    ids = torch.stack([a, torch.cat([b, torch.zeros(4, dtype=torch.long)])])
    mask = (torch.arange(9)[None] < torch.tensor([[9], [5]])).long()
    out = model(ids, attention_mask=mask, decompose=mode)
    after = llama_attrib.decompose_sequence(model, ids, attention_mask=mask, mode=mode)[0]
    for c in (out["attentions"], after):
        for row, single, last in ((0, a, 8), (1, b, 4)):
            alone = model(single[None], decompose=mode)["attentions"]
            token = int(alone.recovery.argmax())
            scores = c[row, token].components
            assert torch.equal(scores[last + 1 :], torch.zeros(8 - last))  # padding contributes 0
            assert torch.allclose(scores[: last + 1], alone[token].components, atol=1e-5, rtol=1e-4)
            assert torch.allclose(c.logits[row], out.logits[row, last], atol=1e-5, rtol=1e-5)


def test_target_generate_logs_no_deprecation_of_its_own() -> None:
    """Dropping the returned cache reads its key without the name transformers 5.x deprecates."""
    model = llama_attrib.wrap(tiny_model(2))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        model.generate(prompt(6), decompose=True, use_cache=True, do_sample=False, **GEN)
    finally:
        library.removeHandler(handler)
    assert not [r.getMessage() for r in records if "deprecated" in r.getMessage()]


def test_longrope_across_its_threshold_while_generate_steps_through_it() -> None:
    """longrope switches factor once the sequence passes original_max_position_embeddings (32):
    generate computed the early keys with the short factor and the later queries with the long
    one, which no forward over the whole sequence reproduces. Forward mode follows generate's
    own computation (its steps add up to generate's logits); target mode, which explains one
    pass over the whole sequence, refuses and says what to do; decompose_sequence explains the
    teacher-forced logits, exactly."""
    from conftest import gradient_x_input

    model = tiny_model(2, rope="longrope")
    ids = prompt(30)
    options = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True}
    plain = model.generate(ids, **options, output_logits=True)
    llama_attrib.wrap(model)
    out = model.generate(ids, decompose="forward", **options)
    assert torch.equal(out.sequences, plain.sequences)
    for k, c in enumerate(out["attentions"]):
        scale = float(plain.logits[k].abs().max())
        assert torch.allclose(c.recovery, plain.logits[k][0], atol=1e-5 * scale, rtol=0)
    with torch.no_grad():
        forced = model(out.sequences[:, :-1], decompose=False).logits[0, 29:]
    consistent = all(
        torch.allclose(forced[k], plain.logits[k][0], atol=1e-5 * float(forced[k].abs().max()), rtol=0)
        for k in range(5)
    )
    if consistent:  # this transformers version's cache reproduces the long factor: explained as is
        target = model.generate(ids, decompose=True, **options)
        assert torch.equal(target.sequences, plain.sequences)
    else:
        with pytest.raises(llama_attrib.DecompositionError, match="longrope crossing"):
            model.generate(ids, decompose=True, **options)
    steps = llama_attrib.decompose_sequence(model, out.sequences, 30)
    llama_attrib.unwrap(model)
    whole = out.sequences[:, :-1]  # one forward over the sequence: the long factor everywhere
    for k, c in enumerate(steps):
        token = int(out.sequences[0, 30 + k])
        components, _, logit = gradient_x_input(model, whole, token, position=29 + k)
        assert torch.allclose(
            c[token].components, components[: 30 + k], atol=1e-5 * abs(logit) + 1e-5, rtol=0
        )
        assert torch.equal(components[30 + k :], torch.zeros(4 - k))  # nothing flows backwards
