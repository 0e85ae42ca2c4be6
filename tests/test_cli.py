"""The ``llama-attrib`` command, on a tiny checkpoint folder and (slow) on SmolLM2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import quantizable_checkpoint
from llama_attrib import Attribution, attribute, quantized
from llama_attrib.cli import main
from llama_attrib.models import load

# the command line: the same on every transformers version, run once in CI
pytestmark = pytest.mark.once


@pytest.fixture(scope="module")
def folder(tiny_folder: Path) -> Path:
    return tiny_folder


def test_cli_prints_generation_tables_and_writes_files(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html, saved = tmp_path / "out.html", tmp_path / "out.json"
    args = [
        "what is the capital of france?",
        "--model",
        str(folder),
        "--chat",
        "--max-new-tokens",
        "3",
        "--html",
        str(html),
        "--json",
        str(saved),
    ]
    assert main(args) == 0
    out, err = capsys.readouterr()
    result = Attribution.load(saved)
    expected = attribute(*load(str(folder)), "what is the capital of france?", 3, chat=True)
    assert result.token_ids == expected.token_ids
    assert np.array_equal(result.token_scores, expected.token_scores, equal_nan=True)
    assert out.strip() == expected.table().strip()
    assert f"generated: {expected.generation!r}" in out and "step 2:" in out
    assert "decomposing" in err  # the progress bar, on stderr
    assert html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_cli_views(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["the capital of france is", "--model", str(folder), "--max-new-tokens", "2", "--no-progress"]
    main([*base, "--top", "3", "--words", "--share", "--drop-first"])
    out, err = capsys.readouterr()
    expected = attribute(*load(str(folder)), "the capital of france is", 2)
    view = expected.words().normalize("share", drop_first=True)
    assert out.strip() == view.table(top=3).strip()
    assert len([line for line in out.splitlines() if line.startswith("  ")]) == 6
    assert "decomposing" not in err


@pytest.mark.slow
def test_cli_default_model_is_smollm2(tmp_path: Path) -> None:
    saved = tmp_path / "r.safetensors"
    command = [sys.executable, "-m", "llama_attrib.cli", "What is the capital of France?", "--chat"]
    command += ["--max-new-tokens", "4", "--top", "3", "--json", str(tmp_path / "r.json")]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    result = Attribution.load(tmp_path / "r.json")
    result.save(saved)
    assert Attribution.load(saved) == result
    assert "The capital of France" in result.generation or "Paris" in result.generation
    assert f"generated: {result.generation!r}" in done.stdout
    assert result.versions["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    np.testing.assert_allclose(np.nansum(result.token_scores.astype(np.float64), 1), result.logits, rtol=1e-5)


def test_cli_sentences_and_the_answers_ranking(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--by sentence splits the user message (not the chat template) and --rank lists the
    sources of the whole answer, largest first, with their shares."""
    message = (
        "the cat sat on the mat.\nthe dogs ran off.\nwhere are the cats"  # the tiny vocabulary: no capitals
    )
    args = [message, "--model", str(folder), "--chat", "--max-new-tokens", "3", "--no-progress"]
    main([*args, "--by", "sentence", "--rank", "2"])
    out, _ = capsys.readouterr()
    result = attribute(*load(str(folder)), message, 3, chat=True)
    view = result.sentences(within=result.find(message))
    assert view.sources[:3] == ["the cat sat on the mat.", "the dogs ran off.", "where are the cats"]
    ranked = view.ranking(k=2)
    lines = out.splitlines()
    assert lines[0].startswith("sources of the answer") and "3 tokens" in lines[0]
    outside = view.outside()
    assert (
        outside is not None and lines[3] == f"  outside the sentences: {outside[2]:6.1%}  {outside[1]:+9.4f}"
    )
    for line, (label, score, share) in zip(lines[1:3], ranked, strict=True):
        assert line.split()[0] in ("1", "2") and f"{share:6.1%}".strip() in line and label in line
        assert f"{score:+9.4f}".strip() in line
    # each sentence's score from the token-level scores of its token positions, summed here
    totals = {
        label: float(np.nansum(result.token_scores[:, positions].astype(np.float64)))
        for label, positions in zip(view.sources, view.columns, strict=True)
        if label != "(rest)"  # outside the sentences: not ranked
    }
    best = sorted(totals, key=lambda label: -totals[label])[:2]
    assert [label for label, _, _ in ranked] == best
    for label, score, _ in ranked:
        assert abs(score - totals[label]) <= 1e-4 * max(1.0, abs(totals[label]))
    assert view.table().strip() in out


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint in widths bitsandbytes quantizes."""
    return quantizable_checkpoint(tmp_path_factory.mktemp("wide"))


def test_load_takes_a_dtype_a_device_and_a_quantization(wide: Path) -> None:
    model, _ = load(str(wide), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.device.type == "cpu"
    assert next(load(str(wide), dtype=torch.float64)[0].parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="float32, bfloat16, float16, float64 or 'auto'"):
        load(str(wide), dtype="half")
    with pytest.raises(ValueError, match="device or device_map"):
        load(str(wide), device="cpu", device_map="auto")
    pytest.importorskip("bitsandbytes")
    four, _ = load(str(wide), quantization="4bit", dtype="float32")
    assert {quantized.kind(m) for m in four.modules()} >= {quantized.BNB_4BIT}
    assert four.model.layers[0].mlp.up_proj.compute_dtype == torch.float32
    eight, _ = load(str(wide), quantization="8bit")
    assert {quantized.kind(m) for m in eight.modules()} >= {quantized.BNB_8BIT}


def test_quantization_without_bitsandbytes_names_the_extra(
    wide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now fails
    with pytest.raises(
        ImportError, match=r"'quantization' extra \(in its clone: pip install -e '\.\[quantization\]'\)"
    ):
        load(str(wide), quantization="4bit")


@pytest.mark.parametrize(
    ("flags", "dtype", "mode"),
    [
        (["--dtype", "bfloat16", "--mode", "forward"], "bfloat16", "forward"),
        (["--component-dtype", "float64", "--max-memory", "2GiB", "--precision", "float32"], "float32", True),
        (["--load-in-8bit", "--dtype", "float32", "--device-map", "cpu"], "float32", True),
        (["--load-in-4bit", "--dtype", "float32", "--device", "cpu"], "float32", True),
        (["--rules", "attnlrp"], "float32", True),
    ],
)
def test_cli_loading_and_decomposition_flags(
    wide: Path, tmp_path: Path, flags: list[str], dtype: str, mode: Any
) -> None:
    saved = tmp_path / "r.json"
    args = [
        "the cat sat",
        "--model",
        str(wide),
        "--max-new-tokens",
        "2",
        "--no-progress",
        "--json",
        str(saved),
    ]
    assert main([*args, *flags]) == 0
    result = Attribution.load(saved)
    assert result.versions["dtype"] == dtype
    assert result.options["mode"] == mode
    generate = result.options["generate"]
    if "--component-dtype" in flags:
        assert generate["component_dtype"] == "torch.float64" and generate["max_memory"] == "2GiB"
        assert generate["precision"] == "float32"
    if "--rules" in flags:  # AttnLRP: what its softmax keeps is saved beside the bias share
        assert generate["rules"] == "attnlrp" and np.all(result.unassigned != 0)
    else:
        assert np.all(result.unassigned == 0)
    if "--load-in-8bit" in flags:  # LLM.int8 rounds the activations: a share of its own
        assert np.all(result.rounding != 0)
    elif "--load-in-4bit" not in flags:
        assert np.all(result.rounding == 0)
    scale = np.abs(result.logits).max()
    totals = np.nansum(result.token_scores.astype(np.float64), 1) + result.no_token
    bound = 5e-2 if dtype == "bfloat16" else 1e-5
    assert np.allclose(totals, result.logits, atol=bound * scale, rtol=0)


def test_cli_verifies_the_ranking(folder: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--verify M: each ranked sentence with the measured drop of the answer's log-probability
    without it (as ranking(verify=M) gives), and the drop without all of them; --html writes
    the same citations into the HTML view."""
    message = "the cat sat on the mat.\nthe dogs ran off.\nwhere are the cats"
    args = [message, "--model", str(folder), "--chat", "--max-new-tokens", "3", "--no-progress"]
    page = tmp_path / "cited.html"
    main([*args, "--by", "sentence", "--rank", "2", "--verify", "3", "--html", str(page)])
    out, _ = capsys.readouterr()
    model, tokenizer = load(str(folder))
    result = attribute(model, tokenizer, message, 3, chat=True)
    cited = result.sentences(within=result.find(message)).ranking(k=2, verify=3, model=model)
    lines = out.splitlines()
    for line, c in zip(lines[1:3], cited, strict=True):
        assert c.label in line and f"drop {c.drop:+8.3f}" in line
        assert ("(not supported)" in line) == (c.drop <= 0)
    assert f"all 2 removed together: drop {cited.together:+8.3f}" in out
    html = page.read_text(encoding="utf-8")
    data = json.loads(
        re.search(r'<script type="application/json" class="la-data">(.*?)</script>', html, re.S)[1]
    )
    assert [(r["label"], r["drop"], r["supported"]) for r in data["citations"]["rows"]] == [
        (c.label, pytest.approx(c.drop, abs=1e-6), c.supported) for c in cited
    ]
