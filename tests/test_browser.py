"""The HTML view in a real headless browser (Debian's chromium + chromium-driver, selenium).

Skipped only where chromium or its driver is not installed; ``make test`` installs both
(scripts/install_browser.sh).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from conftest import tiny_model, tiny_tokenizer
from llama_attrib import Attribution, attribute

# the views' HTML in chromium: the same on every transformers version, run once in CI
pytestmark = [pytest.mark.browser, pytest.mark.once]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
TRANSPARENT = "rgba(0, 0, 0, 0)"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("chromium / chromium-driver not installed: run scripts/install_browser.sh (apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def result() -> Attribution:
    return attribute(tiny_model(), tiny_tokenizer(), "the capital of france is", max_new_tokens=4)


def _rgb(colour: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", colour)[:3])


def _backgrounds(driver: Any) -> list[str]:
    return [
        el.value_of_css_property("background-color")
        for el in driver.find_elements(By.CSS_SELECTOR, ".la-tok")
    ]


def test_clicking_a_generated_token_colours_the_earlier_tokens(
    browser: Any, result: Attribution, tmp_path: Path
) -> None:
    page = tmp_path / "view.html"
    result.to_html(page)
    browser.get(page.as_uri())
    p, g = result.prompt_length, result.n_generated
    before = _backgrounds(browser)  # the view opens on the last step, already coloured
    assert len(before) == len(result.tokens)
    assert all(c != TRANSPARENT for c in before[: p + g - 1]) and set(before[p + g - 1 :]) == {TRANSPARENT}
    assert f"step {g - 1}" in browser.find_element(By.CSS_SELECTOR, ".la-info").text

    browser.find_element(By.CSS_SELECTOR, '.la-gen[data-step="0"]').click()
    step0 = _backgrounds(browser)
    assert all(c != TRANSPARENT for c in step0[:p]) and set(step0[p:]) == {TRANSPARENT}
    row = result.token_scores[0, :p]
    top, bottom = int(np.argmax(row)), int(np.argmin(row))
    r, _, b = _rgb(step0[top])
    assert r > b and _rgb(step0[top]) == (178, 24, 43)  # the largest positive: full red
    if row[bottom] < 0:
        r, _, b = _rgb(step0[bottom])
        assert b > r
    token = browser.find_elements(By.CSS_SELECTOR, ".la-tok")[top]
    assert token.get_attribute("title").endswith(
        f"{float(row[top]):+.4g} (logit, step 0)".replace("e+0", "e+")
    )
    legend = browser.find_element(By.CSS_SELECTOR, ".la-max").text
    assert float(legend) == pytest.approx(float(np.abs(row).max()), rel=1e-3)

    browser.find_element(By.CSS_SELECTOR, '.la-gen[data-step="2"]').click()
    step2 = _backgrounds(browser)
    assert step2[:p] != step0[:p]  # the prompt is recoloured for the new step
    assert all(c != TRANSPARENT for c in step2[: p + 2]) and set(step2[p + 2 :]) == {TRANSPARENT}
    assert "step 2" in browser.find_element(By.CSS_SELECTOR, ".la-info").text

    # The overview: one row per generated token, one cell per source; a row click selects it.
    rows = browser.find_elements(By.CSS_SELECTOR, ".la-ov-row")
    assert len(rows) == g and len(rows[0].find_elements(By.CSS_SELECTOR, "td")) == 1 + len(result.sources)
    rows[1].click()
    assert "step 1" in browser.find_element(By.CSS_SELECTOR, ".la-info").text
    assert _backgrounds(browser)[: p + 1] != step2[: p + 1]

    shot = tmp_path / "view.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_grouped_view_in_the_browser(browser: Any, result: Attribution, tmp_path: Path) -> None:
    spans = result.spans({"subject": result.find("capital of")}, rest=None)
    page = tmp_path / "spans.html"
    spans.to_html(page)
    browser.get(page.as_uri())
    browser.find_element(By.CSS_SELECTOR, '.la-gen[data-step="1"]').click()
    colours = _backgrounds(browser)
    a, b = spans.columns[0]
    assert colours[a] == colours[b] != TRANSPARENT  # a span is one colour
    assert all(colours[i] == TRANSPARENT for i in range(len(colours)) if i not in (a, b))
    title = browser.find_elements(By.CSS_SELECTOR, ".la-tok")[a].get_attribute("title")
    assert title.startswith("subject: ")


def test_flow_view_in_the_browser(browser: Any, tmp_path: Path) -> None:
    """The flow page: layers shown, their heads hidden until the layer is clicked."""
    import llama_attrib
    from conftest import prompt, tiny_model

    f = llama_attrib.flow(tiny_model(2), prompt(9))
    page = tmp_path / "flow.html"
    f.to_html(str(page))
    browser.get(page.as_uri())
    layers = browser.find_elements(By.CSS_SELECTOR, "tr.la-fl-layer")
    parts = browser.find_elements(By.CSS_SELECTOR, 'tr.la-fl-part[data-layer="1"]')
    assert len(layers) == 2 and len(parts) == f.heads + 1
    assert not any(p.is_displayed() for p in parts)
    layers[1].click()
    assert all(p.is_displayed() for p in parts)
    assert not any(
        p.is_displayed() for p in browser.find_elements(By.CSS_SELECTOR, 'tr.la-fl-part[data-layer="0"]')
    )
    cells = parts[0].find_elements(By.CSS_SELECTOR, "td")[1:]
    assert len(cells) == 9 and any(
        c.value_of_css_property("background-color") != "rgba(255, 255, 255, 1)" for c in cells
    )
    layers[1].click()
    assert not any(p.is_displayed() for p in parts)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def _long_document() -> Attribution:
    """A 60-sentence document whose answer comes from sentence 30 (synthetic scores)."""
    sentences = [f"Sentence {i} says little of note here." for i in range(60)]
    sentences[30] = "The access code is 4817."
    words = " ".join(sentences).split(" ")
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)] + [" 48", "17", "."]
    p, g = len(words), 3
    rng = np.random.default_rng(0)
    scores = np.full((g, p + g - 1), np.nan, np.float32)
    source = [i for i, t in enumerate(tokens[:p]) if i >= len(" ".join(sentences[:30]).split(" "))][:5]
    for k in range(g):
        scores[k, : p + k] = rng.normal(0, 0.01, p + k)
        scores[k, source] = 2.0 - k * 0.1
    return Attribution(tokens, list(range(len(tokens))), p, scores, np.nansum(scores, 1))


def test_long_document_view_ranks_and_folds(browser: Any, tmp_path: Path) -> None:
    """Sentences of a long prompt: the whole answer's ranking lists the source sentence first;
    text that scores little is folded (and opens on a click); a ranked source is marked."""
    result = _long_document().sentences()
    page = tmp_path / "long.html"
    result.to_html(page)
    browser.get(page.as_uri())
    toks = browser.find_elements(By.CSS_SELECTOR, ".la-tok")
    marks = browser.find_elements(By.CSS_SELECTOR, ".la-fold-mark")
    assert marks, "a long prompt opens with the low-scoring text folded"
    hidden = [i for i, t in enumerate(toks) if "la-hidden" in t.get_attribute("class")]
    assert len(hidden) > len(toks) / 2
    source = result.columns[result.sources.index("The access code is 4817.")]
    assert not set(source) & set(hidden), "the source sentence stays visible"

    browser.find_element(By.CSS_SELECTOR, ".la-answer").click()
    assert "whole answer" in browser.find_element(By.CSS_SELECTOR, ".la-info").text
    items = browser.find_elements(By.CSS_SELECTOR, ".la-ranking li")
    assert 1 < len(items) <= 10 and "The access code is 4817." in items[0].text
    assert items[0].text.startswith(f"{100 * result.ranking()[0][2]:.1f}%")
    items[0].click()
    marked = [i for i, t in enumerate(toks) if "la-marked" in t.get_attribute("class")]
    assert marked == source

    before = len(browser.find_elements(By.CSS_SELECTOR, ".la-fold-mark"))
    browser.find_elements(By.CSS_SELECTOR, ".la-fold-mark")[0].click()
    assert len(browser.find_elements(By.CSS_SELECTOR, ".la-fold-mark")) == before - 1
    browser.find_element(By.CSS_SELECTOR, ".la-fold").click()  # unticked: everything shown
    assert not browser.find_elements(By.CSS_SELECTOR, ".la-fold-mark")
    assert all("la-hidden" not in t.get_attribute("class") for t in toks)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_the_sink_and_what_lies_outside_the_sentences_do_not_set_the_colour_scale(
    browser: Any, tmp_path: Path
) -> None:
    """The legend's scale is the largest score among the tokens one would cite: the first token
    (an attention sink) and a span view's "(rest)" are coloured, clamped, but left out of it."""
    nan = float("nan")
    scores = np.array([[5.0, 0.5, -1.0, nan], [6.0, 0.25, 2.0, -0.5]])
    tokens = ["<s>", "the", " cat", " sat", " on"]
    result = Attribution(tokens, [1, 2, 3, 4, 5], 3, scores, np.nansum(scores, 1))
    page = tmp_path / "scale.html"
    for view, cited in ((result, 2.0), (result.spans({"the cat": (3, 10)}), 2.25)):
        view.to_html(page)  # "the cat": 0.25 + 2.0; "(rest)": the sink and " sat"
        browser.get(page.as_uri())  # it opens on the last step
        assert float(browser.find_element(By.CSS_SELECTOR, ".la-max").text) == pytest.approx(cited)
        sink = browser.find_elements(By.CSS_SELECTOR, ".la-tok")[0]
        assert sink.value_of_css_property("background-color") != TRANSPARENT  # still coloured


def test_verified_citations_show_share_and_measured_drop(browser: Any, tmp_path: Path) -> None:
    """``to_html(citations=view.ranking(k, verify=m, model=model))``: the list shows each cited
    paragraph with its share and its measured drop, in the verified order; one whose removal
    does not lower the answer's log-probability is marked unsupported (struck through); the
    drop of all of them removed together is stated."""
    from llama_attrib.verify import Citation, Citations

    document = "the cat sat on the mat.\n\nthe dog sat on the rug.\n\nparis is the capital of france."
    model = tiny_model()
    result = attribute(model, tiny_tokenizer(), f"{document}\nwhere is the cat", max_new_tokens=3)
    view = result.sentences("paragraph", within=result.find(document))
    cited = view.ranking(k=3, verify=3, model=model)
    page = tmp_path / "cited.html"
    view.to_html(page, citations=cited)
    browser.get(page.as_uri())
    items = browser.find_elements(By.CSS_SELECTOR, ".la-ranking li")
    assert len(items) == len(cited)
    for li, c in zip(items, cited, strict=True):
        assert float(li.get_attribute("data-drop")) == pytest.approx(c.drop, abs=1e-9)
        assert f"{100 * c.share:.1f}%" in li.text and f"drop {c.drop:.3f}" in li.text
        assert ("la-unsupported" in li.get_attribute("class")) == (not c.supported)
    together = browser.find_element(By.CSS_SELECTOR, ".la-together").text
    assert f"{cited.together:.3f} nats" in together
    # a citation whose removal raised the answer's log-probability is shown as no support
    labels = [label for label, _, _ in view.ranking()]
    made = Citations([Citation(labels[0], 1.0, 0.6, 0.5), Citation(labels[1], 0.5, 0.3, -0.2)])
    made.together = 0.25
    view.to_html(page, citations=made)
    browser.get(page.as_uri())
    first, second = browser.find_elements(By.CSS_SELECTOR, ".la-ranking li")
    assert "la-unsupported" not in first.get_attribute("class") and "(not supported)" not in first.text
    assert "la-unsupported" in second.get_attribute("class") and "(not supported)" in second.text
    assert second.value_of_css_property("text-decoration-line") == "line-through"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
