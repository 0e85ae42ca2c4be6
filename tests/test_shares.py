"""The shares of no token by name: ``Attribution.bias`` holds the biases' share alone, beside
``rounding`` and ``unassigned``; ``no_token`` is their sum; the views label each; a result
saved before the shares were named (format 1, whose "bias" was the sum) loads with each share
where it belongs."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llama_attrib
from conftest import tiny_tokenizer
from llama_attrib import Attribution

SAVED = Path(__file__).parent / "data" / "saved"
sys.path.insert(0, str(SAVED))
from make_v1 import PROMPT, biased_model  # noqa: E402


@pytest.fixture(scope="module")
def fresh() -> Attribution:
    """The run that made the saved files, by today's code: a biased tiny Llama under AttnLRP,
    where both the biases and the rule set's softmax leave a share to no token."""
    return llama_attrib.attribute(biased_model(), tiny_tokenizer(), PROMPT, max_new_tokens=4, rules="attnlrp")


def test_each_share_is_its_own_and_their_sum_is_no_token(fresh: Attribution) -> None:
    """bias is each step's shares['bias'] of the Composition it came from (not the sum), the
    three add up to no_token, and scores + no_token are the logits."""
    model, tokenizer = biased_model(), tiny_tokenizer()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    p = ids.shape[1]
    sequence = ids.new_tensor([fresh.token_ids])
    steps = llama_attrib.decompose_sequence(model, sequence, p, rules="attnlrp")
    for k, c in enumerate(steps):
        got = c[fresh.token_ids[p + k]]
        for name in ("bias", "rounding", "unassigned"):
            assert abs(float(got.shares[name]) - float(fresh.shares[name][k])) <= 1e-5, (name, k)
    assert np.all(np.abs(fresh.bias) > 1e-2) and np.all(np.abs(fresh.unassigned) > 1e-2)
    assert np.allclose(fresh.no_token, fresh.bias + fresh.rounding + fresh.unassigned, atol=1e-6)
    totals = np.nansum(fresh.token_scores.astype(np.float64), 1) + fresh.no_token
    assert np.allclose(totals, fresh.logits, atol=1e-4)
    assert not np.allclose(np.nansum(fresh.token_scores, 1) + fresh.bias, fresh.logits, atol=1e-2)


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_a_result_saved_before_the_shares_were_named_loads(fresh: Attribution, suffix: str) -> None:
    """Format 1 (commit 4ceb182) stored bias + rounding + unassigned as "bias": loaded, each
    share equals today's run of the same model, and no_token equals the file's "bias"."""
    path = SAVED / f"attribution_v1{suffix}"
    loaded = Attribution.load(path)
    if suffix == ".json":
        raw = json.loads(path.read_text())
        assert raw["format"] == "llama_attrib.Attribution/1"
        assert np.allclose(loaded.no_token, raw["bias"], atol=1e-6)
    assert loaded.token_ids == fresh.token_ids
    assert np.allclose(loaded.token_scores, fresh.token_scores, atol=1e-5, equal_nan=True)
    for name in ("bias", "rounding", "unassigned"):
        assert np.allclose(loaded.shares[name], fresh.shares[name], atol=1e-5), name
    assert np.allclose(loaded.no_token, fresh.no_token, atol=1e-5)


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_the_shares_round_trip(fresh: Attribution, tmp_path: Path, suffix: str) -> None:
    again = Attribution.load(fresh.save(tmp_path / f"r{suffix}"))
    for name in ("bias", "rounding", "unassigned"):
        assert np.array_equal(again.shares[name], fresh.shares[name]), name


def test_the_views_label_each_share(fresh: Attribution) -> None:
    """The table has a row per non-zero share, by name and in the view's unit; the dataframe
    too (source -1); the HTML data carries them by name; bias_scores warns and is no_token's."""
    shares = fresh.normalize("share")
    text = shares.table()
    for name in ("bias", "unassigned"):
        value = float(shares.share_scores[name][0])
        assert f"({name})" in text and f"{value:+10.4f}" in text
    assert "(rounding)" not in text  # zero: not a row
    frame = shares.to_dataframe()
    labelled = frame[frame.source == -1]
    assert sorted(set(labelled.label)) == ["bias", "unassigned"]
    first = labelled[labelled.step == 0].set_index("label").score
    assert abs(first["unassigned"] - float(shares.share_scores["unassigned"][0])) < 1e-6
    page: Any = fresh.to_html()
    assert '"unassigned":' in page and "no token: " in page
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = fresh.bias_scores
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert np.array_equal(old, fresh.no_token_scores)
    absolute = np.nansum(np.abs(shares.scores), 1) + np.abs(shares.no_token_scores)
    assert np.allclose(absolute, 1.0, atol=1e-5)
