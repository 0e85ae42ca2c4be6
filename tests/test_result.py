"""attribute() and the Attribution result: numbers, words, spans, units, saving."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest
import torch

import llama_attrib
from conftest import tiny_model, tiny_tokenizer
from llama_attrib import Attribution, attribute
from llama_attrib.tokens import piece_texts, word_groups

# the result object, its saving and loading: the same on every transformers version, run once in CI
pytestmark = pytest.mark.once

PROMPT = "the capital of france is"


@pytest.fixture(scope="module", params=["bytelevel", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return tiny_tokenizer(request.param)


@pytest.fixture(scope="module")
def result(tokenizer: Any) -> Attribution:
    return attribute(tiny_model(), tokenizer, PROMPT, max_new_tokens=5)


def test_scores_are_exact_causal_and_match_generate(tokenizer: Any, result: Attribution) -> None:
    model = tiny_model()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    p = ids.shape[1]
    plain = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert result.token_ids == plain[0].tolist()
    assert result.prompt_length == p and result.n_generated == 5
    assert result.token_scores.shape == (5, p + 4)
    with llama_attrib.decompose(model):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True)
    for k, c in enumerate(out["attentions"]):
        token = result.generated_ids[k]
        row = result.token_scores[k]
        assert np.isnan(row[p + k :]).all() and not np.isnan(row[: p + k]).any()
        assert np.array_equal(row[: p + k], c[token].components.numpy())
        assert result.logits[k] == pytest.approx(float(out.scores[k][0, token]), rel=1e-6)
        assert float(row[: p + k].sum(dtype=np.float64)) == pytest.approx(float(result.logits[k]), rel=1e-5)
    assert "".join(result.tokens) == result.text
    assert result.generated_tokens == result.tokens[p:]
    assert result.source_tokens == result.tokens[: p + 4]


def test_model_is_left_as_it_was(tokenizer: Any) -> None:
    model = tiny_model()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    before, state = model(ids).logits, dict(model.__dict__)
    attribute(model, tokenizer, PROMPT, max_new_tokens=2)
    assert not llama_attrib.is_wrapped(model)
    assert model.__dict__.keys() == state.keys()
    assert torch.equal(model(ids).logits, before)
    llama_attrib.wrap(model)
    attribute(model, tokenizer, PROMPT, max_new_tokens=2)
    assert llama_attrib.is_wrapped(model)  # a wrapped model stays wrapped
    llama_attrib.unwrap(model)
    assert torch.equal(model(ids).logits, before)


def test_chat_messages_and_chat_text_use_the_template(tokenizer: Any) -> None:
    model = tiny_model()
    messages = [{"role": "system", "content": "you answer in one word."}, {"role": "user", "content": PROMPT}]
    r = attribute(model, tokenizer, messages, max_new_tokens=2)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r.token_ids[: r.prompt_length] == tokenizer(rendered, add_special_tokens=False).input_ids
    assert r.options["prompt"] == messages and r.options["max_new_tokens"] == 2
    text = attribute(model, tokenizer, PROMPT, max_new_tokens=2, chat=True)
    single = attribute(model, tokenizer, [{"role": "user", "content": PROMPT}], max_new_tokens=2)
    assert text.token_ids == single.token_ids
    assert np.array_equal(text.token_scores, single.token_scores, equal_nan=True)
    with pytest.raises(ValueError, match="chat=False"):
        attribute(model, tokenizer, messages, chat=False)


def test_generation_options_pass_through_and_sampled_tokens_are_explained(tokenizer: Any) -> None:
    model = tiny_model()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    torch.manual_seed(7)
    plain = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.5, pad_token_id=0)
    torch.manual_seed(7)
    r = attribute(model, tokenizer, PROMPT, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.5)
    assert r.token_ids == plain[0].tolist()
    assert r.options["generate"]["temperature"] == 1.5 and r.options["generate"]["do_sample"] is True
    sums = np.nansum(r.token_scores.astype(np.float64), axis=1)
    np.testing.assert_allclose(sums, r.logits, rtol=1e-5, atol=1e-5 * float(np.abs(r.logits).max()))
    assert set(r.versions) >= {"llama_attrib", "torch", "transformers", "pydec", "model", "dtype"}
    assert r.versions["transformers"] == __import__("transformers").__version__


def test_mode_is_passed_as_decompose(tokenizer: Any, result: Attribution) -> None:
    forward = attribute(tiny_model(), tokenizer, PROMPT, max_new_tokens=5, mode="forward")
    assert forward.options["mode"] == "forward" and result.options["mode"] is True
    assert forward.token_ids == result.token_ids
    np.testing.assert_allclose(forward.token_scores, result.token_scores, rtol=1e-4, atol=1e-5)


def test_reserved_options_are_refused(tokenizer: Any) -> None:
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="output_attentions"):
        attribute(tiny_model(), tokenizer, PROMPT, output_attentions=False)
    with pytest.raises(TypeError, match="chat messages"):
        attribute(tiny_model(), tokenizer, [1, 2])  # type: ignore[list-item]  # not prompts
    assert len(attribute(tiny_model(), tokenizer, [PROMPT, PROMPT], 2)) == 2  # several prompts


def test_progress_bar_goes_to_stderr(tokenizer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    attribute(tiny_model(), tokenizer, PROMPT, max_new_tokens=3, progress=True)
    captured = capsys.readouterr()
    assert "decomposing" in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("pieces", "words"),
    [
        (
            ["<s>", "the", "Ġcap", "ital", "Ġof", "Ċ", "Ġfr", "ance"],
            ["<s>", "the", "Ġcapital", "Ġof", "Ċ", "Ġfrance"],
        ),
        (
            ["<s>", "▁the", "▁cap", "ital", "▁of", "<0x0A>", "fr", "ance"],
            ["<s>", "▁the", "▁capital", "▁of", "<0x0A>", "france"],
        ),
    ],
)
def test_word_groups_from_raw_pieces(pieces: list[str], words: list[str]) -> None:
    special = [p == "<s>" for p in pieces]
    texts = [p.replace("Ġ", " ").replace("Ċ", "\n") if "Ġ" in p or "Ċ" in p else p for p in pieces]
    groups = word_groups(texts, pieces, special)
    assert ["".join(pieces[i] for i in g) for g in groups] == words


def test_piece_texts_keep_the_space_for_sentencepiece() -> None:
    for kind in ("bytelevel", "sentencepiece"):
        tok = tiny_tokenizer(kind)
        ids = tok("the capital of france").input_ids
        texts, pieces, special = piece_texts(tok, ids)
        assert special == [True] + [False] * (len(ids) - 1)
        assert "".join(texts[1:]).strip() == "the capital of france"
        assert texts[2] == " capital" and pieces[2] in ("Ġcapital", "▁capital")


def test_words_sum_pieces(result: Attribution) -> None:
    words = result.words()
    assert words.sources[:6] == ["<s>", result.tokens[1], " capital", " of", " france", " is"]
    assert all(g[0] < result.prompt_length or g[0] >= result.prompt_length for g in words.columns)
    assert not any(g[0] < result.prompt_length <= g[-1] for g in words.columns)
    np.testing.assert_allclose(np.nansum(words.scores, 1), np.nansum(result.scores, 1), rtol=1e-6)
    for k in range(result.n_generated):  # a word shows at a step once its first piece is there
        visible = [j for j, g in enumerate(words.columns) if g[0] < result.prompt_length + k]
        assert list(np.flatnonzero(~np.isnan(words.scores[k]))) == visible
    assert words.tokens_level() == result


def test_spans_by_char_and_token(result: Attribution) -> None:
    start, end = result.find("capital of")
    assert result.text[start:end] == "capital of"
    named = result.spans({"subject": (start, end), "country": result.find("france")})
    assert named.sources == ["subject", "country", "(rest)"]
    assert [result.tokens[i] for i in named.columns[0]] == [" capital", " of"]
    assert [result.tokens[i] for i in named.columns[1]] == [" france"]
    np.testing.assert_allclose(np.nansum(named.scores, 1), result.logits, rtol=1e-5, atol=1e-5)
    tok = result.spans([(2, 4)], by="token", rest=None)
    assert tok.sources == [" capital of"] and tok.columns == [[2, 3]]
    np.testing.assert_allclose(tok.scores[:, 0], result.token_scores[:, 2:4].sum(1), rtol=1e-6)
    with pytest.raises(ValueError, match="fewer than"):
        result.find("paris")
    with pytest.raises(ValueError, match="covers no source"):
        result.spans({"end": (len(result.text), len(result.text) + 3)})


def test_message_is_found_verbatim_or_falls_back_with_a_warning(result: Attribution) -> None:
    start, end = result.message("\n capital of france\n")  # stripped when not found as given
    assert result.text[start:end] == "capital of france"
    assert end <= len("".join(result.tokens[: result.prompt_length]))
    with pytest.warns(UserWarning, match="verbatim"):
        assert result.message("Capital Of France") is None
    with pytest.warns(UserWarning, match="verbatim"):
        assert result.message(result.generation.strip()) is None  # the answer is no message


def test_normalisations(result: Attribution) -> None:
    share = result.normalize("share")
    np.testing.assert_allclose(np.nansum(np.abs(share.scores), 1), 1.0, rtol=1e-9)
    assert np.array_equal(np.sign(share.scores), np.sign(result.scores), equal_nan=True)
    no_first = result.normalize("logit", drop_first=True)
    assert np.isnan(no_first.scores[:, 0]).all()
    np.testing.assert_array_equal(no_first.scores[:, 1:], result.scores[:, 1:])
    both = result.normalize("share", drop_first=True)
    np.testing.assert_allclose(np.nansum(np.abs(both.scores), 1), 1.0, rtol=1e-9)
    # Views compose: shares of words are sums of token shares.
    np.testing.assert_allclose(np.nansum(share.words().scores, 1), np.nansum(share.scores, 1), rtol=1e-9)


def test_top_k(result: Attribution) -> None:
    top = result.top_k(3)
    assert len(top) == result.n_generated and all(len(t) == 3 for t in top)
    for k, contributors in enumerate(top):
        row = result.scores[k]
        assert contributors[0].column == int(np.nanargmax(np.abs(row)))
        assert [abs(c.score) for c in contributors] == sorted(
            (abs(c.score) for c in contributors), reverse=True
        )
        assert all(c.label == result.sources[c.column] for c in contributors)
    assert result.top_k(100, step=0)[0].__len__() == result.prompt_length


def test_to_dataframe(result: Attribution) -> None:
    df = result.to_dataframe()
    p, g = result.prompt_length, result.n_generated
    assert len(df) == sum(p + k for k in range(g))
    assert list(df.columns) == [
        "step",
        "generated",
        "generated_id",
        "logit",
        "source",
        "label",
        "positions",
        "score",
    ]
    np.testing.assert_allclose(
        df.groupby("step")["score"].sum().to_numpy(), result.logits, rtol=1e-5, atol=1e-5
    )
    words = result.words().to_dataframe()
    assert set(words["label"]) <= set(result.words().sources)


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_save_load_round_trip(result: Attribution, tmp_path: Any, suffix: str) -> None:
    biased = dataclasses.replace(result, bias=np.arange(5, dtype=np.float32) - 2.0)
    views = [
        result,
        result.words().normalize("share", drop_first=True),
        result.spans({"x": result.find("france")}),
        biased,
    ]
    for i, view in enumerate(views):
        path = view.save(tmp_path / f"r{i}{suffix}")
        loaded = Attribution.load(path)
        assert loaded == view
        assert np.array_equal(loaded.scores, view.scores, equal_nan=True)
        assert loaded.options == view.options and loaded.versions == view.versions
        assert np.array_equal(loaded.bias, view.bias)
    assert views[0] != views[1]
    if suffix == ".json":  # plain JSON (no NaN literals): readable anywhere
        data = json.loads((tmp_path / "r0.json").read_text(), parse_constant=lambda c: pytest.fail(c))
        assert [len(r) for r in data["token_scores"]] == [result.prompt_length + k for k in range(5)]
    with pytest.raises(ValueError, match=r"\.json or \.safetensors"):
        result.save(tmp_path / "r.pkl")


def test_constructor_checks_shapes(result: Attribution) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Attribution(
            result.tokens, result.token_ids, result.prompt_length + 1, result.token_scores, result.logits
        )
    with pytest.raises(ValueError, match="unit"):
        result.normalize("percent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source positions"):
        result.grouped([[0, 99]])


def test_find_compares_whitespace_loosely_where_the_tokenizer_changed_it() -> None:
    tokens = ["<s>", "the", "  cat", "\n", " sat", " on", " it"]
    result = Attribution(
        tokens=tokens, token_ids=list(range(7)), prompt_length=6,
        token_scores=np.zeros((1, 6), np.float32), logits=np.zeros(1, np.float32),
    )  # fmt: skip
    text = result.text  # "<s>the  cat\n sat on it"
    assert result.find("cat") == (text.index("cat"), text.index("cat") + 3)  # verbatim first
    start, end = result.find("the cat sat")  # the document as the user wrote it
    assert text[start:end] == "the  cat\n sat"
    assert result.find("sat  on\n") == (text.index("sat"), text.index(" it"))  # ends stripped, runs any
    with pytest.raises(ValueError, match="by='token'"):
        result.find("the dog")
    with pytest.raises(ValueError, match="fewer than 2"):
        result.find("cat", occurrence=1)
