"""Every ```python block of the README and docs/ runs, so the docs cannot drift from the code.

A block runs in a fresh namespace that holds what the docs' prose assumes exists: a tiny
checkpoint folder (``path``), the wrapped tiny model and its tokenizer, a generation (``ids``,
``out``, ``seq``, ``p``), a short document and question, tokens to contrast, a result. The
comment ``<!-- docs-test: slow -->`` before a block runs it on SmolLM2-135M-Instruct in the
slow suite (what it says needs a real model); ``<!-- docs-test: skip REASON -->`` says why a
block cannot run here (a GPU, an 8B checkpoint). A block without either runs in the default
suite.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import llama_attrib
from conftest import tiny_model, tiny_tokenizer
from llama_attrib import families

# the docs' code blocks and references: the same on every transformers version, run once in CI
pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- docs-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
DOCUMENT = "the cat sat on the mat. the dog sat on the rug. paris is the capital of france."


def blocks() -> list[Any]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text[: match.start("code")].count("\n") + 1
            mark = match.group("mark") or ""
            marks = []
            if mark.startswith("skip"):
                marks.append(pytest.mark.skip(reason=mark.removeprefix("skip").strip() or "marked skip"))
            elif mark == "slow":
                marks.append(pytest.mark.slow)
            found.append(pytest.param(match.group("code"), mark, id=f"{path.name}:{line}", marks=marks))
    return found


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tiny_model(2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def namespace(folder: Path, slow: bool) -> dict[str, Any]:
    """What the docs' prose assumes: on SmolLM2 for a slow block, else on the tiny model."""
    from llama_attrib.models import load

    model, tokenizer = load(None if slow else str(folder))
    llama_attrib.wrap(model)
    document = (
        DOCUMENT if not slow else " ".join(["The library opens at nine."] * 20 + [DOCUMENT.capitalize()])
    )
    question = "What is the capital of France?" if slow else "what is the capital of france?"
    ids = tokenizer("the cat sat on the", return_tensors="pt").input_ids
    out = model.generate(ids, decompose=True, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    long = tokenizer(" ".join([DOCUMENT] * 4), return_tensors="pt").input_ids[:, :62]
    seq = long[0]
    result = llama_attrib.attribute(model, tokenizer, "the cat sat on the", 4)
    thirds = [list(part) for part in torch.arange(ids.shape[1]).tensor_split(3)]  # groups of ids' positions
    return {
        "llama_attrib": llama_attrib,
        "torch": torch,
        "path": str(folder),
        "model": model,
        "tokenizer": tokenizer,
        "ids": ids,
        "out": out,
        "prompt_length": ids.shape[1],
        "seq": seq,
        "p": 60,
        "yes_id": int(tokenizer(" cat", add_special_tokens=False).input_ids[0]),
        "no_id": int(tokenizer(" dog", add_special_tokens=False).input_ids[0]),
        "a": 5,
        "b": 6,
        "token": 7,
        "document": document,
        "question": question,
        "result": result,
        "step": 0,
        "layer": 0,
        "groups": [[int(i) for i in part] for part in thirds],
        "labels": ["first", "second", "third"],
    }


@pytest.mark.parametrize(("code", "mark"), blocks())
def test_docs_code_block_runs(
    code: str, mark: str, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the files a block writes (answer.html, result.json) land here
    (tmp_path / "report.txt").write_text(DOCUMENT)
    scope = namespace(folder, slow=mark == "slow")
    if "register_family(" in code:
        excerpt(code, scope)
        return
    exec(compile(code, "<docs>", "exec"), scope)


def excerpt(code: str, scope: dict[str, Any]) -> None:
    """docs/families.md's worked example: the family it registers is families/gpt_neox.py's,
    field by field (the registry is put back afterwards)."""
    from llama_attrib import rules
    from llama_attrib.families import gpt_neox

    real = families.FAMILIES["GPTNeoXForCausalLM"]
    scope.update({name: getattr(families, name) for name in ("ATTENTION", "EMBEDDING", "MLP", "NORM")})
    scope.update(rules=rules, Family=families.Family, Topology=families.Topology)
    scope["register_family"] = families.register_family
    try:
        exec(compile(code, "<docs>", "exec"), scope)
    finally:
        families.register_family(real)
    documented = scope["GPT_NEOX"]
    same = ("name", "model_classes", "classes", "topology", "layer_roles", "mlp", "norm")
    for name in same:
        assert getattr(documented, name) == getattr(real, name), name
    assert documented.attention.out == real.attention.out
    config = dataclasses.asdict(gpt_neox.GPT_NEOX.topology)
    assert config == dataclasses.asdict(documented.topology)

    class Attention(torch.nn.Module):  # the attributes _value_rows reads
        head_size = 8
        query_key_value = torch.nn.Linear(8, 3 * 8 * 4)

    rows = documented.attention.value.rows
    assert torch.equal(rows(Attention()), real.attention.value.rows(Attention()))


def test_every_block_is_collected() -> None:
    ids = [p.id for p in blocks()]
    assert len(ids) >= 14 and any(i.startswith("README.md") for i in ids)
    assert os.path.exists(ROOT / "docs" / "usage.md")


def test_the_citation_and_the_license_are_the_package_s() -> None:
    """CITATION.cff names the package's version and license; LICENSE is the license setup.cfg
    declares."""
    import yaml

    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == llama_attrib.__version__
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "Apache-2.0"
    assert "license = Apache-2.0" in (ROOT / "setup.cfg").read_text()
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_supported_md_lists_every_registered_model_class() -> None:
    text = (ROOT / "docs" / "supported.md").read_text()
    missing = [name for name in families.FAMILIES if f"`{name}`" not in text]
    assert not missing, f"docs/supported.md does not list {missing}"
    rows = {line.split("|")[1].strip(" `") for line in text.splitlines() if line.startswith("| `")}
    assert rows == set(families.FAMILIES), "the per-family table has one row per registered model class"


NAME = re.compile(r"\bllama_attrib(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"`((?:src|tests|benchmarks|scripts|notebooks|docs)/[\w./-]+?)(?::\w+)?`")


def test_every_name_the_docs_give_exists() -> None:
    """Each ``llama_attrib.x.y`` of README.md and docs/ resolves to a module or an attribute."""
    import importlib

    missing = []
    for path in DOCS:
        for name in sorted(set(NAME.findall(path.read_text(encoding="utf-8")))):
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
                try:
                    found: Any = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for attribute in parts[cut:]:
                    found = getattr(found, attribute, None)
                break
            if found is None:
                missing.append(f"{path.name}: {name}")
    assert not missing, missing


def test_every_file_the_docs_name_exists() -> None:
    """Each repository path in a code span of README.md and docs/ (``benchmarks/bench.py``,
    ``tests/test_sweep.py``...) is there."""
    missing = [
        f"{path.name}: {name}"
        for path in DOCS
        for name in sorted(set(PATH.findall(path.read_text(encoding="utf-8"))))
        if not (ROOT / name.rstrip("/")).exists() and "*" not in name
    ]
    assert not missing, missing
