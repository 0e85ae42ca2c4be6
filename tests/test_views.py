"""Views of a result: the terminal table, the self-contained HTML, the matplotlib heatmap."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest

from conftest import tiny_model, tiny_tokenizer
from llama_attrib import Attribution, attribute
from llama_attrib.views import visible

# the views' rendering: the same on every transformers version, run once in CI
pytestmark = pytest.mark.once

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def result() -> Attribution:
    return attribute(tiny_model(), tiny_tokenizer(), "the capital of france is", max_new_tokens=4)


def _payload(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" class="la-data">(.*?)</script>', html, re.S)
    assert match is not None
    data: dict[str, Any] = json.loads(match.group(1).replace("<\\/", "</"))
    return data


def test_table_lists_every_step_and_source(result: Attribution) -> None:
    text = result.table()
    for k, token in enumerate(result.generated_tokens):
        assert f"step {k}: {token!r}" in text
        assert (
            f"logit {float(result.logits[k]):.4f} = sum of {result.prompt_length + k} contributions" in text
        )
    rows = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(rows) == sum(result.prompt_length + k for k in range(result.n_generated))
    first = rows[0].split()
    assert first[0] == "0" and float(first[-1]) == pytest.approx(float(result.scores[0, 0]), abs=1e-4)


def test_table_top_and_str(result: Attribution) -> None:
    text = result.table(top=2)
    assert len([line for line in text.splitlines() if line.startswith("  ")]) == 2 * result.n_generated
    best = result.top_k(1, step=0)[0][0]
    assert f"{best.score:+10.4f}" in text.split("step 1:")[0]
    assert str(result) == result.table(top=10)
    shares = result.words().normalize("share", drop_first=True).table()
    assert "share of |total|, first token left out" in shares


def test_html_is_self_contained_and_carries_the_scores(result: Attribution, tmp_path: Path) -> None:
    path = tmp_path / "view.html"
    page = result.to_html(path)
    assert path.read_text(encoding="utf-8") == page
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "addEventListener" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no CDN, no network
    assert page.count('class="la-tok la-gen') == result.n_generated
    assert page.count('class="la-tok') == len(result.tokens)
    data = _payload(page)
    assert data["tokens"] == result.tokens and data["prompt_length"] == result.prompt_length
    for k, row in enumerate(data["scores"]):
        limit = result.prompt_length + k
        assert all(v is None for v in row[limit:])
        np.testing.assert_allclose(row[:limit], result.token_scores[k, :limit], rtol=1e-5)
    fragment = result._repr_html_()
    assert not fragment.startswith("<!DOCTYPE") and 'class="la-attrib"' in fragment
    assert fragment.split('id="')[1][:15] != page.split('id="')[1][:15]  # unique ids per block


def test_html_escapes_text_and_script_breakers(result: Attribution) -> None:
    tricky = Attribution(
        tokens=["<s>", "</script><b>x", " & y", "!"],
        token_ids=[1, 5, 6, 7],
        prompt_length=3,
        token_scores=np.array([[0.5, -1.0, 2.0]]),
        logits=np.array([1.5]),
    )
    page = tricky.to_html()
    assert "</script><b>" not in page and "&lt;/script&gt;&lt;b&gt;x" in page
    assert _payload(page)["tokens"][1] == "</script><b>x"


def test_html_of_grouped_views_colours_every_token_of_a_group(result: Attribution) -> None:
    spans = result.spans({"subject": result.find("capital of")})
    data = _payload(spans.to_html())
    a, b = spans.columns[0]
    assert data["labels"][a] == data["labels"][b] == "subject"
    assert data["scores"][0][a] == data["scores"][0][b] == pytest.approx(spans.scores[0, 0], rel=1e-5)


def test_plot_heatmap(result: Attribution, tmp_path: Path) -> None:
    ax = result.plot()
    image = ax.images[0]
    assert image.get_array().shape == result.scores.shape
    assert image.get_array().mask[0, result.prompt_length :].all()  # above the diagonal: masked
    vmin, vmax = image.get_clim()
    assert vmin == -vmax and vmax == pytest.approx(float(np.nanmax(np.abs(result.scores))))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [visible(s)[:16] for s in result.sources] and "␣capital" in labels
    ax.figure.savefig(tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
    words_ax = result.words().plot()
    assert len(words_ax.get_xticklabels()) == len(result.words().sources)


def test_tables_explain_the_first_token_sink() -> None:
    """When the first token leads, the table says what it is and how to set it apart."""
    from llama_attrib import Attribution

    scores = np.array([[9.0, 1.0, -2.0, np.nan], [8.0, 0.5, 1.0, 2.0]], dtype=np.float32)
    result = Attribution(["<s>", "a", "b", "c", "d"], [1, 5, 6, 7, 8], 3, scores, np.nansum(scores, 1))
    assert "attention sink" in result.table() and "drop_first=True" in result.table()
    assert "attention sink" not in result.normalize("logit", drop_first=True).table()
    quiet = Attribution(["<s>", "a", "b", "c", "d"], [1, 5, 6, 7, 8], 3, -scores[:, ::-1].copy(), np.zeros(2))
    quiet.token_scores[:, 0] = 0.1
    assert "attention sink" not in quiet.table()
