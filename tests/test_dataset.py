"""Data sets of prompts: JSONL in, JSONL/Parquet out, resumable, sharded over processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llama_attrib
from conftest import tiny_model, tiny_tokenizer
from llama_attrib import dataset
from llama_attrib.models import load

# the data set runner's files: the same on every transformers version, run once in CI
pytestmark = pytest.mark.once

PROMPTS = [
    {"id": "a", "prompt": "the capital of france is"},
    {"id": "b", "prompt": "one two three"},
    {"messages": [{"role": "user", "content": "what is the capital of italy"}]},
    {"id": "d", "prompt": "the river flows to the"},
    {"id": "e", "prompt": "a cat sat on"},
]


def write_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def expected(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, llama_attrib.Attribution]:
    return {
        str(r["id"]): llama_attrib.attribute(model, tokenizer, r.get("messages", r.get("prompt")), 4)
        for r in rows
    }


def same(a: llama_attrib.Attribution, b: llama_attrib.Attribution) -> None:
    """Equal to float32 rounding: 1e-5 of the largest score (a process with one thread sums
    its matrix products in another order than one with two)."""
    assert a.token_ids == b.token_ids
    scale = float(np.nanmax(np.abs(b.token_scores)))
    np.testing.assert_allclose(a.token_scores, b.token_scores, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_dataset_rows_equal_single_attributions(tmp_path: Path, suffix: str) -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    rows = dataset.read_prompts(write_prompts(tmp_path))
    assert [r["id"] for r in rows] == ["a", "b", 2, "d", "e"]  # a missing id is the line number
    out = tmp_path / f"out{suffix}"
    assert dataset.attribute_dataset(model, tokenizer, rows, out, max_new_tokens=4) == 5
    dataset.merge(rows, out)
    results = dataset.load_results(out)
    assert list(results) == ["a", "b", "2", "d", "e"]
    for key, want in expected(model, tokenizer, rows).items():
        same(results[key], want)
    assert not llama_attrib.is_wrapped(model)


def test_an_interrupted_run_resumes_without_losing_or_repeating_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    rows = dataset.read_prompts(write_prompts(tmp_path))
    out = tmp_path / "out.jsonl"
    real, calls = dataset.attribute, []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset, "attribute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dataset.attribute_dataset(model, tokenizer, rows, out, max_new_tokens=4)
    monkeypatch.undo()
    part = dataset.parts_folder(out) / "rank-0.jsonl"
    assert len(part.read_text().splitlines()) == 2
    with open(part, "a") as f:
        f.write('{"id": "d", "tokens": [')  # a row cut mid-write by a crash
    with pytest.raises(RuntimeError, match="not finished"):
        dataset.merge(rows, out)
    assert dataset.attribute_dataset(model, tokenizer, rows, out, max_new_tokens=4) == 3
    assert dataset.attribute_dataset(model, tokenizer, rows, out, max_new_tokens=4) == 0
    dataset.merge(rows, out)
    results = dataset.load_results(out)
    assert len(out.read_text().splitlines()) == 5
    for key, want in expected(model, tokenizer, rows).items():
        same(results[key], want)


def test_a_rank_never_cuts_another_rank_s_line_in_progress(tmp_path: Path) -> None:
    """Rank 1 is writing a row when rank 0 starts: rank 0 leaves rank 1's part file as it is
    (it used to cut every half-written last line, so rank 1's row, finished afterwards, was a
    broken line and was lost), and the merge counts that row once rank 1 has finished it."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    rows = dataset.read_prompts(write_prompts(tmp_path))
    out = tmp_path / "out.jsonl"
    assert dataset.attribute_dataset(model, tokenizer, rows, out, rank=1, world=2, max_new_tokens=4) == 2
    theirs = dataset.parts_folder(out) / "rank-1.jsonl"
    whole = theirs.read_bytes()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[-1] + b"\n"
    theirs.write_bytes(whole[: -len(last)] + last[:20])  # rank 1 mid-way through its last row
    in_progress = theirs.read_bytes()
    assert dataset.attribute_dataset(model, tokenizer, rows, out, rank=0, world=2, max_new_tokens=4) == 3
    assert theirs.read_bytes() == in_progress
    with open(theirs, "ab") as f:  # rank 1 finishes its row
        f.write(last[20:])
    dataset.merge(rows, out)
    assert len(out.read_text().splitlines()) == 5


def test_a_merge_killed_midway_leaves_the_previous_output_whole(tmp_path: Path) -> None:
    """A merge whose process dies after writing one row (os._exit in a subprocess) leaves the
    output of the merge before it byte for byte (it used to write the output in place)."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    prompts = write_prompts(tmp_path)
    rows = dataset.read_prompts(prompts)
    out = tmp_path / "out.jsonl"
    dataset.attribute_dataset(model, tokenizer, rows, out, max_new_tokens=4)
    dataset.merge(rows, out)
    before = out.read_bytes()
    killer = (
        "import json, os, sys\n"
        "from llama_attrib import dataset\n"
        "real, calls = json.dumps, []\n"
        "def dumps(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        sys.stdout.flush(); os._exit(3)  # killed after the first row\n"
        "    return real(*a, **k)\n"
        "dataset.json.dumps = dumps\n"
        f"dataset.merge(dataset.read_prompts({str(prompts)!r}), {str(out)!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, check=False)
    assert done.returncode == 3, done.stderr
    assert out.read_bytes() == before
    dataset.merge(rows, out)  # a merge after it replaces what the killed one left
    assert out.read_bytes() == before


def test_bad_input_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "prompt": "x", "messages": []}\n')
    with pytest.raises(ValueError, match="exactly one of"):
        dataset.read_prompts(path)
    path.write_text('{"id": 1, "prompt": "x"}\n{"id": 1, "prompt": "y"}\n')
    with pytest.raises(ValueError, match="not unique"):
        dataset.read_prompts(path)


def test_two_processes_with_accelerate_launch_on_gloo(tmp_path: Path) -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts, out = write_prompts(tmp_path), tmp_path / "out.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "llama_attrib.dataset", str(prompts), str(out), "--model", str(folder)]
    command += ["--max-new-tokens", "4", "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0/2: 3 prompts" in done.stdout and "rank 1/2: 2 prompts" in done.stdout
    parts = sorted(p.name for p in dataset.parts_folder(out).iterdir())
    assert parts == ["rank-0.jsonl", "rank-1.jsonl"]
    results = dataset.load_results(out)
    rows = dataset.read_prompts(prompts)
    loaded, _ = load(str(folder))
    for key, want in expected(loaded, tokenizer, rows).items():
        same(results[key], want)


def test_dataset_by_sentence_keeps_groups_and_the_ranking(tmp_path: Path) -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    rows = [
        {
            "id": "doc",
            "prompt": "a cat sat.\nthe dog ran.\nwhere is the cat",
        },  # no capitals in the tiny vocabulary
        {"id": "chat", "messages": [{"role": "user", "content": "one fact here.\nanother one.\nwhich"}]},
        # capitals are not in the tiny vocabulary: the message does not come back verbatim
        {"id": "odd", "messages": [{"role": "user", "content": "One fact.\nWhich"}]},
    ]
    out = tmp_path / "out.jsonl"
    with pytest.warns(UserWarning, match="verbatim"):
        dataset.attribute_dataset(model, tokenizer, rows, out, max_new_tokens=3, by="sentence")
    dataset.merge(rows, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    results = dataset.load_results(out)
    for row, record in zip(rows, records, strict=True):
        result = results[row["id"]]
        prompt = row.get("messages", row.get("prompt"))
        alone = llama_attrib.attribute(model, tokenizer, prompt, 3)
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        if row["id"] == "odd":
            assert text not in alone.text
            want = alone.sentences()  # the whole prompt, chat template included
        else:
            want = alone.sentences(within=alone.find(text))
        assert result.sources == want.sources and result.groups == want.groups
        assert [r["label"] for r in record["ranking"]] == [label for label, _, _ in want.ranking()]
        np.testing.assert_allclose(
            [r["score"] for r in record["ranking"]], [s for _, s, _ in want.ranking()], rtol=1e-5
        )
    assert "(rest)" in results["chat"].sources  # the chat template is not a sentence of the message
    assert results["chat"].sources[:3] == ["one fact here.", "another one.", "which"]


def test_the_runner_s_loading_and_decomposition_flags(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    prompts, out = write_prompts(tmp_path), tmp_path / "out.jsonl"
    flags = ["--model", str(folder), "--dtype", "bfloat16", "--device", "cpu", "--mode", "forward"]
    flags += ["--max-new-tokens", "2", "--rank", "0", "--world", "1", "--no-progress"]
    assert dataset.main([str(prompts), str(out), *flags]) == 0
    results = dataset.load_results(out)
    assert len(results) == len(PROMPTS)
    for result in results.values():
        assert result.versions["dtype"] == "bfloat16" and result.options["mode"] == "forward"
        totals = np.nansum(result.token_scores.astype(np.float64), 1) + result.no_token
        assert np.allclose(totals, result.logits, atol=5e-2 * np.abs(result.logits).max(), rtol=0)
    # the rule set: AttnLRP in target mode, its unassigned share saved with each row
    out = tmp_path / "attnlrp.jsonl"
    flags = ["--model", str(folder), "--rules", "attnlrp", "--max-new-tokens", "2", "--no-progress"]
    assert dataset.main([str(prompts), str(out), *flags, "--rank", "0", "--world", "1"]) == 0
    for result in dataset.load_results(out).values():
        assert result.options["generate"]["rules"] == "attnlrp" and np.all(result.unassigned != 0)
        totals = np.nansum(result.token_scores.astype(np.float64), 1) + result.no_token
        assert np.allclose(totals, result.logits, atol=3e-5 * np.abs(result.logits).max(), rtol=0)


def test_batches_of_rows_equal_single_attributions(tmp_path: Path) -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    rows = dataset.read_prompts(write_prompts(tmp_path))
    out = tmp_path / "out.jsonl"
    assert dataset.attribute_dataset(model, tokenizer, rows, out, max_new_tokens=4, batch_size=2) == 5
    dataset.merge(rows, out)
    results = dataset.load_results(out)
    for key, want in expected(model, tokenizer, rows).items():
        same(results[key], want)


def test_the_runner_s_citations_are_the_verified_ranking(tmp_path: Path) -> None:
    """--verify M (verify=): each record's citations equal ranking(verify=M) on the same result:
    label, score, share, measured drop, whether it is support, and the drop of all together."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    rows = [{"id": "doc", "prompt": "a cat sat.\nthe dog ran.\nwhere is the cat"}]
    out = tmp_path / "out.jsonl"
    dataset.attribute_dataset(model, tokenizer, rows, out, max_new_tokens=3, by="sentence", verify=2)
    record = json.loads(next(iter((out.parent / (out.name + ".parts")).glob("*.jsonl"))).read_text())
    alone = llama_attrib.attribute(model, tokenizer, rows[0]["prompt"], 3)
    cited = alone.sentences().ranking(verify=2, model=model)
    assert [c["label"] for c in record["citations"]] == [c.label for c in cited]
    for got, want in zip(record["citations"], cited, strict=True):
        assert got["drop"] == pytest.approx(want.drop, abs=1e-5) and got["supported"] == want.supported
    assert record["together"] == pytest.approx(cited.together, abs=1e-5)
    with pytest.raises(ValueError, match="by='sentence'"):
        dataset.attribute_dataset(model, tokenizer, rows, tmp_path / "x.jsonl", verify=2)


def test_the_runner_s_verify_flag(tmp_path: Path, tiny_folder: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "doc", "prompt": "a cat sat.\nthe dog ran.\nwhere is the cat"}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    flags = ["--model", str(tiny_folder), "--by", "sentence", "--verify", "2", "--max-new-tokens", "2"]
    assert dataset.main([str(prompts), str(out), *flags, "--world", "1", "--rank", "0", "--no-progress"]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert len(record["citations"]) == 2 and "together" in record
