"""``llama_attrib.models.load()`` and the loading flags: the attention implementation a
checkpoint supports (Gemma 2: eager), ``--attn-implementation`` and accelerate's per-device
``max_memory`` (``--device-max-memory``)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import llama_attrib
from conftest import prompt, tiny_model, tiny_tokenizer
from llama_attrib import models
from test_families import family_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name in ("llama", "gemma2"):
        path = tmp_path_factory.mktemp(name)
        (tiny_model() if name == "llama" else family_model("gemma2")).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        out[name] = path
    return out


def test_load_picks_an_attention_the_checkpoint_supports(folders: dict[str, Path]) -> None:
    llama, _ = models.load(str(folders["llama"]))
    assert llama.config._attn_implementation == "sdpa"
    gemma, _ = models.load(str(folders["gemma2"]))  # sdpa has no soft-cap: Gemma 2 refuses it
    assert gemma.config._attn_implementation == "eager"
    ids = prompt(7)
    with torch.no_grad():
        before = gemma(ids).logits
    steps = llama_attrib.decompose_sequence(gemma, ids[0], 4)
    assert len(steps) == 3 and torch.equal(gemma(ids).logits, before)
    eager, _ = models.load(str(folders["llama"]), "eager")
    assert eager.config._attn_implementation == "eager"


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    models.add_arguments(parser, device="cpu")
    return parser.parse_args(list(flags))


def test_the_flags_reach_from_pretrained(folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = models.from_arguments(
        _args("--model", str(folders["llama"]), "--attn-implementation", "eager")
    )
    assert model.config._attn_implementation == "eager"
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(copy.deepcopy(kwargs))  # transformers converts max_memory in place
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    flags = ("--model", str(folders["llama"]), "--device-map", "auto", "--device-max-memory", "cpu=4GiB")
    models.from_arguments(_args(*flags))
    assert seen["max_memory"] == {"cpu": "4GiB"} and seen["device_map"] == "auto"
    assert models.device_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        models.device_memory("20GiB")
    with pytest.raises(ValueError, match="give device_map too"):
        models.load(str(folders["llama"]), max_memory={"cpu": "4GiB"})


@pytest.mark.parametrize("name", ["gpt_oss", "deepseek_v3", "granitemoehybrid", "gemma3", "mistral3"])
def test_load_and_the_cli_on_each_new_class(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``load()`` with its defaults loads a saved tiny checkpoint of each class added for the
    checkpoints people download (GPT-OSS: eager, it has no sdpa; Gemma 3 and Mistral Small 3 as
    published: their multimodal classes), which decomposes as the model it was saved from, and
    the CLI explains a generation from the folder."""
    from llama_attrib.cli import main
    from test_families import refused_here

    if refused_here(name):
        pytest.skip(f"{refused_here(name)}: refused (tests/test_families.py)")
    if name in ("gemma3", "mistral3"):  # Gemma 3 and Mistral Small 3 as published
        from test_published import published

        model = published(name)
    else:
        model = family_model(name)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, _ = models.load(str(tmp_path))
    assert type(loaded) is type(model)
    if name == "gpt_oss":
        assert loaded.config._attn_implementation == "eager"
    ids = prompt(9)[0]
    pairs = zip(
        llama_attrib.decompose_sequence(loaded, ids, 6),
        llama_attrib.decompose_sequence(model, ids, 6),
        strict=True,
    )
    for c, d in pairs:
        token = int(d.recovery.argmax())
        scale = float(d[token].components.abs().max())  # sdpa (loaded) against eager: ~1e-7
        assert torch.allclose(c[token].components, d[token].components, atol=1e-5 * scale, rtol=0)
    args = ["the capital of france is", "--model", str(tmp_path), "--max-new-tokens", "2", "--no-progress"]
    assert main(args) == 0
    assert "step 1:" in capsys.readouterr().out
