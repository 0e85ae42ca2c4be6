"""``llama-attrib serve`` as a real process on a free port, driven by the official ``openai``
client, raw HTTP and headless chromium: answers, attributions equal to the library's, the
status codes of bad requests, a full queue and a client that goes away mid-stream."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import tiny_model, tiny_tokenizer

# the server and its page: the same on every transformers version, run once in CI
pytestmark = pytest.mark.once
openai = pytest.importorskip("openai", reason="the dev extra has the openai client")
pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn)")

QUESTION = [{"role": "user", "content": "the cat sat on the"}]
CLI = Path(sys.executable).parent / "llama-attrib"


class Server:
    def __init__(self, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(CLI), "serve", "--port", str(self.port), *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.process.stdout.read()[-3000:]}")  # type: ignore[union-attr]
            try:
                self.name = self.get("/v1/models")["data"][0]["id"]
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("the server did not start in 120 s")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as reply:
            return json.loads(reply.read())

    def post(self, path: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def client(self) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def folder(tiny_folder: Path) -> Path:
    return tiny_folder


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    running = Server("--model", str(folder), "--max-prompt-tokens", "64", "--max-new-tokens", "32")
    try:
        yield running
    finally:
        running.stop()


def _rows(attribution: dict[str, Any]) -> np.ndarray:
    return np.array([[np.nan if x is None else x for x in t["scores"]] for t in attribution["tokens"]])


def test_the_openai_client_gets_an_answer_and_its_sources(server: Server, folder: Path) -> None:
    """Non-streamed and streamed answers are the same text; each choice's attribution gives
    every token's sources, and its numbers are the library's own for the same request."""
    import llama_attrib
    from llama_attrib.models import load

    client = server.client()
    reply = client.chat.completions.create(model=server.name, messages=QUESTION, max_tokens=5)
    choice = reply.choices[0]
    attribution = choice.attribution  # an extra field: the client keeps it
    assert len(attribution["tokens"]) == reply.usage.completion_tokens == 5
    for token in attribution["tokens"]:
        total = np.nansum([x for x in token["scores"] if x is not None]) + sum(token["no_token"].values())
        assert abs(total - token["logit"]) <= 1e-4 * max(1.0, abs(token["logit"]))
        assert len(token["sources"]) == 5 and token["sources"][0]["position"] is not None

    model, tokenizer = load(str(folder))
    mine = llama_attrib.attribute(model, tokenizer, QUESTION, max_new_tokens=5, chat=True)
    assert attribution["token_ids"] == mine.token_ids
    scale = np.nanmax(np.abs(mine.token_scores))
    assert np.allclose(_rows(attribution), mine.token_scores, atol=1e-5 * scale, equal_nan=True)

    chunks = list(
        client.chat.completions.create(model=server.name, messages=QUESTION, max_tokens=5, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    last = chunks[-1].choices[0]
    assert last.finish_reason == choice.finish_reason
    assert np.allclose(_rows(last.attribution), _rows(attribution), atol=1e-6 * scale, equal_nan=True)


def test_completions_and_a_response_generated_elsewhere(server: Server) -> None:
    client = server.client()
    reply = client.completions.create(model=server.name, prompt="the cat sat", max_tokens=4)
    assert len(reply.choices[0].attribution["tokens"]) == 4
    chat = client.chat.completions.create(model=server.name, messages=QUESTION, max_tokens=4)
    response = chat.choices[0].message.content
    status, body = server.post("/v1/attribute", {"messages": QUESTION, "response": response})
    assert status == 200, body
    given = body["attribution"]
    assert (
        given["token_ids"][: given["prompt_length"]]
        == chat.choices[0].attribution["token_ids"][: given["prompt_length"]]
    )
    # teacher-forced on the same tokens: the same numbers (the response re-encodes to the same ids here)
    if given["token_ids"] == chat.choices[0].attribution["token_ids"]:
        assert np.allclose(_rows(given), _rows(chat.choices[0].attribution), atol=1e-5, equal_nan=True)
    status, body = server.post(
        "/v1/attribute",
        {"messages": QUESTION, "response": response, "attribution": {"rules": "attnlrp", "by": "word"}},
    )
    assert status == 200 and body["attribution"]["rules"] == "attnlrp" and body["attribution"]["by"] == "word"
    assert any(t["no_token"]["unassigned"] != 0 for t in body["attribution"]["tokens"])


def test_the_parts_of_a_marked_document_are_ranked(server: Server) -> None:
    # paragraphs: the tiny tokenizer has no capital letters for the sentence splitter
    document = "the cat sat on the mat.\n\nthe dog sat on the rug."
    messages = [{"role": "user", "content": f"{document}\nwhere did the cat sit?"}]
    options = {"by": "paragraph", "document": document, "rank": 3}
    status, body = server.post(
        "/v1/chat/completions",
        {"model": server.name, "messages": messages, "max_tokens": 3, "attribution": options},
    )
    assert status == 200, body
    attribution = body["choices"][0]["attribution"]
    ranking = attribution["ranking"]  # the document's parts only: the rest is reported apart
    assert {r["text"].strip() for r in ranking} == {"the cat sat on the mat.", "the dog sat on the rug."}
    assert abs(sum(abs(r["share"]) for r in ranking) + abs(attribution["outside"]["share"]) - 1) <= 1e-5


@pytest.mark.parametrize(
    ("body", "raw", "status", "says"),
    [
        (None, b'{"model": "x", "messages": [', 400, "not valid JSON"),
        ({"messages": QUESTION, "max_tokens": 2, "temprature": 0.5}, None, 400, "temprature"),
        ({"messages": QUESTION, "max_tokens": 999}, None, 400, "at most 32"),
        ({"messages": [{"role": "user", "content": "cat " * 400}], "max_tokens": 2}, None, 413, "at most 64"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
            None,
            400,
            "",
        ),
        ({"messages": QUESTION, "n": 2}, None, 400, "n"),
        ({"messages": QUESTION, "attribution": {"rules": "lrp-magic"}}, None, 400, "rules must be one of"),
        ({"messages": []}, None, 400, "messages"),
    ],
)
def test_a_bad_request_gets_its_status_and_a_message(
    server: Server, body: Any, raw: bytes | None, status: int, says: str
) -> None:
    if body is not None:
        body = {"model": server.name, **body}
    got, reply = server.post("/v1/chat/completions", body, raw)
    assert got == status, reply
    assert says in reply["error"]["message"]


def test_an_unknown_model_is_404_and_the_server_is_unchanged_after_bad_requests(server: Server) -> None:
    got, reply = server.post("/v1/chat/completions", {"model": "gpt-4", "messages": QUESTION})
    assert got == 404 and server.name in reply["error"]["message"]
    first = server.client().chat.completions.create(model=server.name, messages=QUESTION, max_tokens=3)
    server.post("/v1/chat/completions", None, b"{")
    again = server.client().chat.completions.create(model=server.name, messages=QUESTION, max_tokens=3)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.choices[0].attribution["tokens"] == first.choices[0].attribution["tokens"]
    assert server.get("/health")["pending"] == 0


def test_flow_of_one_token(server: Server) -> None:
    chat = server.client().chat.completions.create(model=server.name, messages=QUESTION, max_tokens=2)
    attribution = chat.choices[0].attribution
    token = attribution["tokens"][0]
    ids = attribution["token_ids"][: token["position"]]
    status, flow = server.post("/v1/flow", {"token_ids": ids, "target": token["id"]})
    assert status == 200, flow
    scores = np.array(flow["scores"])  # [sources, layers, heads + 1]
    assert scores.shape == (len(ids), 2, 5) and flow["layers"] == 2 and flow["heads"] == 4
    assert np.allclose(scores.sum(0), np.array(flow["by_part"]), atol=1e-5)
    assert abs(flow["logit"] - token["logit"]) <= 1e-4 * max(1.0, abs(token["logit"]))


def test_the_explorer_page_is_served(server: Server) -> None:
    with urllib.request.urlopen(server.url + "/", timeout=30) as reply:
        page = reply.read().decode()
    assert reply.status == 200 and 'id="answer"' in page and "textContent" in page


@pytest.fixture(scope="module")
def smollm2_server() -> Iterator[Server]:
    running = Server("--max-queue", "0", "--max-new-tokens", "400")
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.slow
def test_a_full_queue_answers_503_and_every_answer_equals_the_request_served_alone(
    smollm2_server: Server,
) -> None:
    server = smollm2_server
    body = {
        "model": server.name,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 6,
    }
    alone = server.post("/v1/chat/completions", body)
    assert alone[0] == 200
    replies: list[tuple[int, Any]] = []
    threads = [
        threading.Thread(target=lambda: replies.append(server.post("/v1/chat/completions", body)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(status for status, _ in replies)
    assert len(replies) == 4 and set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for status, reply in replies:
        if status == 503:
            assert "try again" in reply["error"]["message"]
        else:
            assert reply["choices"][0]["message"] == alone[1]["choices"][0]["message"]
            assert (
                reply["choices"][0]["attribution"]["tokens"]
                == alone[1]["choices"][0]["attribution"]["tokens"]
            )


@pytest.mark.slow
def test_a_client_gone_mid_stream_stops_its_generation(smollm2_server: Server) -> None:
    server = smollm2_server
    body = {"model": server.name, "messages": [{"role": "user", "content": "Tell me a long story."}]}
    before = server.post("/v1/chat/completions", {**body, "max_tokens": 4})[1]
    served = server.get("/health")["served"]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    payload = json.dumps({**body, "max_tokens": 400, "stream": True, "attribution": False})
    connection.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
    stream = connection.getresponse()
    assert stream.status == 200
    assert stream.readline().startswith(b"data: ")  # the first chunk: generation has started
    connection.close()  # the client goes away; 400 tokens would take far longer than the wait below
    deadline = time.monotonic() + 20
    while server.get("/health")["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    health = server.get("/health")
    assert health["pending"] == 0 and health["served"] == served  # stopped, not finished
    after = server.post("/v1/chat/completions", {**body, "max_tokens": 4})[1]
    assert after["choices"][0]["message"] == before["choices"][0]["message"]
    assert after["choices"][0]["attribution"]["tokens"] == before["choices"][0]["attribution"]["tokens"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    import test_browser

    yield from test_browser.browser.__wrapped__()  # type: ignore[attr-defined]


def _wait(driver: Any, condition: Any, seconds: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds).until(condition)


@pytest.mark.browser
def test_the_explorer_streams_an_answer_and_colours_a_token_s_sources(server: Server, browser: Any) -> None:
    """Type a prompt, see the answer arrive, click a token: the prompt is coloured by that token's
    scores (the server's own numbers); open its flow and click a head. Token text stays text."""
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    _wait(browser, lambda d: "model:" in d.find_element(By.ID, "status").text)
    browser.find_element(By.ID, "prompt").send_keys("the cat sat on the")
    steps = browser.find_element(By.ID, "max")
    steps.clear()
    steps.send_keys("4")
    browser.find_element(By.ID, "send").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#answer .gen")) == 4)
    assert "done" in browser.find_element(By.ID, "status").text

    same = server.client().chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "the cat sat on the"}], max_tokens=4
    )
    attribution = same.choices[0].attribution
    browser.find_element(By.CSS_SELECTOR, '#answer .gen[data-step="1"]').click()
    spans = browser.find_elements(By.CSS_SELECTOR, "#source .src")
    assert len(spans) == len(attribution["tokens_text"])
    scored = {}
    for s in spans:
        if s.get_attribute("data-score"):
            scored[int(s.get_attribute("data-position"))] = float(s.get_attribute("data-score"))
    row = attribution["tokens"][1]["scores"]
    assert set(scored) == {i for i, x in enumerate(row) if x is not None}
    assert all(abs(scored[i] - row[i]) <= 1e-4 for i in scored)
    clear = "rgba(0, 0, 0, 0)"
    for s in spans:
        if abs(scored.get(int(s.get_attribute("data-position")), 0.0)) > 1e-3:
            assert s.value_of_css_property("background-color") != clear
    assert len(browser.find_elements(By.CSS_SELECTOR, "#top li")) == 5
    assert browser.find_elements(By.CSS_SELECTOR, "#source s") == []  # "<s>" shown as text, not parsed
    assert "<s>" in browser.find_element(By.ID, "source").text

    browser.find_element(By.ID, "flow-button").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "table.flow td"))
    cell = browser.find_element(
        By.CSS_SELECTOR, 'table.flow td[data-layer="1"][data-part="4"]'
    )  # layer 1's MLP
    cell.click()
    assert "layer 1, the MLP" in browser.find_element(By.ID, "source-title").text
    assert browser.find_elements(By.CSS_SELECTOR, "#source .src[data-score]")


@pytest.mark.browser
def test_the_same_page_shows_a_result_in_a_notebook(browser: Any, tmp_path: Path) -> None:
    """``result.explore()``: the server's page with the result embedded, no chat box; a click
    colours the sources."""
    from selenium.webdriver.common.by import By

    import llama_attrib

    result = llama_attrib.attribute(tiny_model(), tiny_tokenizer(), "the cat sat on the", max_new_tokens=3)
    explorer = result.explore()
    assert explorer._repr_html_().startswith("<iframe srcdoc=")
    page = tmp_path / "explore.html"
    explorer.to_html(str(page))
    browser.get(page.as_uri())
    assert not browser.find_element(By.ID, "prompt").is_displayed()
    browser.find_element(By.CSS_SELECTOR, '#answer .gen[data-step="2"]').click()
    scored = browser.find_elements(By.CSS_SELECTOR, "#source .src[data-score]")
    assert len(scored) == result.prompt_length + 2
    best = max(scored, key=lambda s: abs(float(s.get_attribute("data-score"))))
    column = int(best.get_attribute("data-position"))
    assert column == int(np.nanargmax(np.abs(result.token_scores[2])))


def test_a_response_too_long_to_explain_is_413(server: Server) -> None:
    status, reply = server.post("/v1/attribute", {"messages": QUESTION, "response": "the cat " * 40})
    assert status == 413 and "at most 32" in reply["error"]["message"]
    status, reply = server.post("/v1/attribute", {"response": "the cat"})
    assert status == 400 and "messages or prompt" in reply["error"]["message"]
