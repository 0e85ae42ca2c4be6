"""The notebooks in notebooks/ run top to bottom (nbclient, SmolLM2) and show what they say."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

import llama_attrib

# the notebooks run as a user runs them: the same on every transformers version, run once in CI
pytestmark = [pytest.mark.slow, pytest.mark.once]

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(autouse=True)
def same_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel (run in a temporary folder) imports the llama_attrib under test."""
    source = str(Path(llama_attrib.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))


def run(name: str, cwd: Path) -> Any:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{name} is stored with outputs: clear them"
    )
    resources = {"metadata": {"path": str(cwd)}}  # files a notebook writes land in cwd
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources=resources).execute()
    return notebook


def outputs(notebook: Any, mime: str) -> list[str]:
    return [
        out["data"][mime]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "data" in out and mime in out["data"]
    ]


def test_notebooks_are_listed() -> None:
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == [
        "chat_exploration.ipynb",
        "groups_and_targets.ipynb",
        "inside_the_model.ipynb",
        "large_model.ipynb",
        "quickstart.ipynb",
    ]


def test_large_model_recipe_runs_at_small_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 7-8B recipe on SmolLM2 (no LLAMA_ATTRIB_MODEL): it loads in bfloat16 on this
    machine's device, and the planted fact is the document sentence the answer came from."""
    monkeypatch.delenv("LLAMA_ATTRIB_MODEL", raising=False)
    notebook = run("large_model.ipynb", tmp_path)
    text = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "bfloat16, loaded in" in text and "unwrapped: True" in text
    answer = re.search(r"tokens, answer '(.*)', ", text)
    assert answer is not None and "4817" in answer.group(1)
    first = re.search(r"%\s+[+-][\d.]+\s+(.*)", text.split("tokens, answer")[1])
    assert first is not None and first.group(1) == "The access code for the archive room is 4817."


def test_quickstart(tmp_path: Path) -> None:
    notebook = run("quickstart.ipynb", tmp_path)
    html = outputs(notebook, "text/html")
    assert len(html) == 2 and all('class="la-attrib"' in h and "la-gen" in h for h in html)
    assert "Paris" in outputs(notebook, "text/plain")[0]  # result.generation
    assert (tmp_path / "quickstart_heatmap.png").stat().st_size > 5000


def test_chat_exploration(tmp_path: Path) -> None:
    notebook = run("chat_exploration.ipynb", tmp_path)
    html = outputs(notebook, "text/html")
    assert any("system prompt" in h and "question" in h for h in html)  # the span table and view
    assert sum('class="la-attrib"' in h for h in html) == 2


def test_groups_and_targets(tmp_path: Path) -> None:
    notebook = run("groups_and_targets.ipynb", tmp_path)
    streams = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "question:" in streams
    padded = re.findall(r"pad positions: (\d+) their contribution: (\S+)", streams)
    assert padded and any(int(n) > 0 for n, _ in padded)  # a row that is really padded
    assert all(float(share) == 0.0 for n, share in padded if int(n) > 0)  # contributes exactly 0


def test_inside_the_model(tmp_path: Path) -> None:
    notebook = run("inside_the_model.ipynb", tmp_path)
    streams = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "flow summed over layers and parts == per-token scores: True" in streams
    assert re.search(r"top prompt tokens: \[\('[^']*Oslo'", streams)  # the source found first
    assert "reaches the answer mostly through layer" in streams
    html = outputs(notebook, "text/html")
    assert any('class="la-flow"' in h and "la-fl-layer" in h for h in html)
    assert (
        sum("image/png" in out.get("data", {}) for c in notebook.cells for out in c.get("outputs", [])) == 2
    )
