"""The faithfulness harness (llama_attrib.evaluation) on tiny random models: fast, exact checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import prompt, tiny_model
from llama_attrib.evaluation import CATEGORIES, METHODS, Config, Setup, encode, load_prompts, metrics
from llama_attrib.evaluation.harness import (
    RANDOM,
    evaluate_prompt,
    format_table,
    report,
    summarize,
)
from llama_attrib.evaluation.methods import feature_ablation, feature_groups, integrated_gradients
from llama_attrib.evaluation.prompts import Encoded, Prompt, spread

# the evaluation's metrics and harness: the same on every transformers version, run once in CI
pytestmark = pytest.mark.once

REPLACEMENT = 0  # the tiny models' pad token


def test_prompt_set_schema() -> None:
    prompts = load_prompts()
    assert len(prompts) >= 60
    assert len({p.id for p in prompts}) == len(prompts)
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert all(p.chat for p in prompts if p.category == "instruction")
    for category in ("copying", "long"):
        group = [p for p in prompts if p.category == category]
        assert len(group) >= 5
        for p in group:
            assert p.source is not None and p.source_span is not None and p.answer is not None
            start, end = p.source_span
            assert 0 <= start < end <= len(p.prompt) and p.prompt[start:end] == p.source
            # the answer is copied from the span
            assert p.answer.strip() in p.source or p.source.startswith(p.answer.strip())
    # long prompts: the source sits in the first sentences, the question at the very end
    for p in (p for p in prompts if p.category == "long"):
        assert len(p.prompt) > 2500 and p.source_span is not None and p.source_span[1] < 300


def test_spread_takes_every_category() -> None:
    chosen = spread(load_prompts(), 5)
    assert [p.category for p in chosen] == list(CATEGORIES)[:5]


def _linear_logprob(weights: torch.Tensor) -> metrics.LogProb:
    """A stand-in model: log p = sum of the weights of the tokens not replaced."""
    return lambda ids: ((ids != REPLACEMENT).float() * weights).sum(-1)


def test_curve_end_points_on_a_model() -> None:
    model = tiny_model()
    ids = prompt(12)[0]
    target = 5
    logprob = metrics.logprob_fn(model, target)
    orders = {"a": torch.arange(12), "b": torch.randperm(12, generator=torch.Generator().manual_seed(0))}
    curves = metrics.curves(logprob, ids, orders, [0.1, 0.25, 0.5], REPLACEMENT)
    full = float(logprob(ids[None])[0])
    none = float(logprob(torch.full_like(ids, REPLACEMENT)[None])[0])
    for c in curves.values():
        assert c.fractions == [0.0, 0.1, 0.25, 0.5, 1.0]
        assert c.deletion[0] == pytest.approx(full, abs=1e-5) and c.deletion[-1] == pytest.approx(
            none, abs=1e-5
        )
        assert c.insertion[0] == pytest.approx(none, abs=1e-5) and c.insertion[-1] == pytest.approx(
            full, abs=1e-5
        )
    # an inner point is the model on the perturbed copy: top ceil(0.25 * 12) = 3 of order "a" removed
    removed = ids.clone()
    removed[:3] = REPLACEMENT
    assert curves["a"].deletion[2] == pytest.approx(float(logprob(removed[None])[0]), abs=1e-5)
    assert curves["a"].comprehensiveness(0.25) == pytest.approx(full - curves["a"].deletion[2])


def test_aopc_of_the_true_order_beats_random() -> None:
    weights = torch.tensor([0.1, 3.0, -1.0, 0.5, 2.0, 0.0, 1.5, -0.5, 0.2, 1.0])
    ids = torch.arange(1, 11)
    g = torch.Generator().manual_seed(0)
    orders = {"true": metrics.ranking(weights), "reverse": metrics.ranking(-weights)}
    orders.update({f"random{i}": torch.randperm(10, generator=g) for i in range(20)})
    curves = metrics.curves(_linear_logprob(weights), ids, orders, [0.1, 0.2, 0.3, 0.5], REPLACEMENT)
    true, reverse = curves.pop("true"), curves.pop("reverse")
    # removing the largest weights first drops log p the most: 3, 3+2, 3+2+1.5, 3+2+1.5+1+0.5
    assert true.aopc_deletion() == pytest.approx((3.0 + 5.0 + 6.5 + 8.0) / 4)
    assert true.aopc_insertion() == pytest.approx(true.aopc_deletion())  # linear: symmetric
    assert true.sufficiency(0.5) == pytest.approx(float(weights.sum()) - 8.0)
    for c in curves.values():
        assert reverse.aopc_deletion() <= c.aopc_deletion() <= true.aopc_deletion()
        assert reverse.aopc_insertion() <= c.aopc_insertion() <= true.aopc_insertion()


def test_ranking_drop_first_and_counts() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, 3.0, -2.0])
    assert metrics.ranking(scores).tolist() == [0, 2, 3, 1, 4]
    assert metrics.ranking(metrics.drop_first(scores)).tolist() == [2, 3, 1, 4, 0]
    assert metrics.keep_counts(10, [0.05, 0.1, 0.25, 0.5]) == [1, 1, 3, 5]
    with pytest.raises(ValueError):
        metrics.curves(_linear_logprob(scores), torch.arange(1, 6), {}, [1.0], REPLACEMENT)


def test_span_rank_on_a_constructed_case() -> None:
    scores = torch.tensor([9.0, 0.1, 0.7, 4.0, 0.3, 6.0])
    assert metrics.span_rank(scores, [3, 4]) == 3  # 9 and 6 beat the span's best, 4
    assert metrics.span_rank(scores, [0]) == 1
    assert metrics.span_rank(scores, [1]) == 6
    assert metrics.span_rank(metrics.drop_first(scores), [5]) == 1
    with pytest.raises(ValueError):
        metrics.span_rank(scores, [])


def test_feature_groups_token_or_sentence() -> None:
    texts = ["A", " cat", ".", " It", " sat", "!\n", " End"]
    assert feature_groups(texts, 7, 10).tolist() == list(range(7))
    assert feature_groups(texts, 7, 4).tolist() == [0, 0, 0, 1, 1, 1, 2]


@pytest.fixture(scope="module")
def scored() -> tuple[torch.nn.Module, torch.Tensor, int, dict[str, list[torch.Tensor]]]:
    pytest.importorskip("captum", reason="the baselines need captum (pip install -e .[eval])")
    model = tiny_model().requires_grad_(False)
    ids, prompt_length = prompt(10)[0], 7
    setup = Setup(replacement=REPLACEMENT, ig_steps=4, ablation_tokens=6, token_texts=["a"] * 10)
    return (
        model,
        ids,
        prompt_length,
        {name: m(model, ids, prompt_length, setup) for name, m in METHODS.items()},
    )


def test_every_method_scores_every_step(scored: tuple[torch.nn.Module, torch.Tensor, int, dict]) -> None:
    _, _, prompt_length, scores = scored
    assert set(scores) == set(METHODS)
    for name, steps in scores.items():
        assert [s.shape for s in steps] == [torch.Size([prompt_length + k]) for k in range(3)], name
        assert all(torch.isfinite(s).all() for s in steps), name
    for k in range(3):  # attention rows and rollout rows are distributions
        assert float(scores["attention-last"][k].sum()) == pytest.approx(1.0, abs=1e-5)
        assert float(scores["attention-rollout"][k].sum()) == pytest.approx(1.0, abs=1e-5)
        assert metrics.ranking(scores["decomposition-no-first"][k])[-1] == 0


def test_decomposition_scores_sum_to_the_logit(
    scored: tuple[torch.nn.Module, torch.Tensor, int, dict],
) -> None:
    model, ids, prompt_length, scores = scored
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    for k, s in enumerate(scores["decomposition"]):
        logit = float(logits[prompt_length - 1 + k, ids[prompt_length + k]])
        assert float(s.sum()) == pytest.approx(logit, rel=1e-4, abs=1e-4)


def test_gradient_methods_are_exact_on_their_own_terms(
    scored: tuple[torch.nn.Module, torch.Tensor, int, dict],
) -> None:
    model, ids, prompt_length, scores = scored
    prefix, target = ids[:prompt_length], int(ids[prompt_length])
    with torch.no_grad():
        full = float(model(prefix[None]).logits[0, -1, target])
        base = float(model(torch.full_like(prefix, REPLACEMENT)[None]).logits[0, -1, target])
    # integrated gradients from the replacement token: completeness, up to the Riemann error
    fine = integrated_gradients(model, prefix, target, Setup(replacement=REPLACEMENT, ig_steps=64))
    assert float(fine.sum()) == pytest.approx(full - base, abs=0.05 * abs(full - base) + 0.02)
    # a prefix of 7 > 6 tokens without a sentence end is one feature: ablating it replaces
    # every token, and every token gets the drop in log p(target) when all are replaced
    logprob = metrics.logprob_fn(model, target)
    drop = float(logprob(prefix[None])[0] - logprob(torch.full_like(prefix, REPLACEMENT)[None])[0])
    assert torch.allclose(scores["feature-ablation"][0], torch.full((7,), drop), atol=1e-4)


def test_feature_ablation_is_captums_llm_attribution() -> None:
    """Token features: the same scores as captum's LLMAttribution(FeatureAblation) on the text."""
    captum_attr = pytest.importorskip("captum.attr", reason="needs captum (pip install -e .[eval])")
    from conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model().requires_grad_(False)  # vocabulary of 96 >= the tokenizer's
    assert len(tokenizer) <= model.config.vocab_size
    text = "the cat sat on the mat"
    ids = torch.tensor(tokenizer.encode(text))
    target = 7
    setup = Setup(replacement=REPLACEMENT, ablation_tokens=64)
    ours = feature_ablation(model, ids, target, setup)
    llm = captum_attr.LLMAttribution(captum_attr.FeatureAblation(model), tokenizer)
    theirs = llm.attribute(
        captum_attr.TextTokenInput(text, tokenizer, baselines=REPLACEMENT),
        target=torch.tensor([target]),
        forward_in_tokens=False,
    )
    assert theirs.token_attr is not None and len(ours) == len(ids) >= 5 and float(ours.abs().max()) > 1e-3
    assert torch.allclose(ours, theirs.token_attr[0].float(), atol=1e-4)
    assert torch.allclose(ours, theirs.seq_attr.float(), atol=1e-4)


def test_harness_end_to_end() -> None:
    pytest.importorskip("captum", reason="the baselines need captum (pip install -e .[eval])")
    model = tiny_model().requires_grad_(False)
    ids = prompt(9)[0]
    p = Prompt(id="copying-99", category="copying", prompt="x", answer="t5", source="x", source_start=0)
    config = Config(methods=list(METHODS), steps=2, fractions=[0.25, 0.5], fixed=0.25, ig_steps=2)
    setup = Setup(replacement=REPLACEMENT, ig_steps=2)
    record = evaluate_prompt(model, p, Encoded(ids, [3, 4]), setup, config, lambda t: f"t{t}")
    assert len(record["steps"]) == 2 and set(record["seconds"]) == set(METHODS)
    assert set(record["steps"][0]["curves"]) == {*METHODS, RANDOM}
    if record["answer_matches"]:
        assert all(1 <= r <= 9 for r in record["span_rank"].values())
    table = summarize([record], config)
    assert set(table) == {*METHODS, RANDOM}
    assert all(math.isfinite(table[m]["del_aopc_all"]) for m in table)
    text = format_table(table, config)
    assert text.count("\n") == len(table) + 1 and "comp@25%" in text
    # the printout: all prompts, then the short and the long ones, each with its counts
    long = {**record, "id": "long-99", "category": "long", "seconds_total": 90.0}
    short = {**record, "seconds_total": 30.0}
    printed = report([short, long], config)
    assert printed.count("| method |") == 3
    assert "All prompts: 2 prompts, 4 explained tokens" in printed and ", 2.0 min" in printed
    assert "Long prompts: 1 prompts, 2 explained tokens" in printed and ", 1.5 min" in printed
    assert printed.index("All prompts") < printed.index("not long") < printed.index("Long prompts")
    assert report([short], config).count("| method |") == 1


@pytest.mark.slow
def test_prompts_on_smollm2(smollm2: tuple[object, object]) -> None:
    """With the real tokenizer: long prompts have 500+ tokens, every source span is found."""
    tokenizer = smollm2[1]
    for p in load_prompts():
        encoded = encode(p, tokenizer)
        if p.category == "long":
            assert len(encoded.ids) >= 500, p.id
        if p.source is not None:
            assert encoded.source_positions, p.id
            text = tokenizer.decode(encoded.ids[encoded.source_positions])  # type: ignore[attr-defined]
            assert p.source in text, p.id


def test_faithfulness_tables_come_from_the_shipped_run() -> None:
    """Every row of the faithfulness tables (docs/faithfulness.md) is what the shipped run's records give."""
    import json

    root = Path(__file__).resolve().parent.parent
    saved = json.loads((root / "benchmarks" / "faithfulness.json").read_text(encoding="utf-8"))
    config = Config(**saved["config"])
    printed = report(saved["records"], config).splitlines()
    text = (root / "docs" / "faithfulness.md").read_text(encoding="utf-8")
    section = text.split("## Against ContextCite")[0]  # that section's table is another benchmark's
    rows = [line.replace("**", "") for line in section.splitlines() if line.startswith("| ")]
    rows = [r for r in rows if not r.startswith("| method")]
    assert len(rows) == 3 * (len(config.methods) + 1)  # all prompts, short, long
    for row in rows:
        assert row in printed, row


@pytest.mark.slow
def test_the_command_on_smollm2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m llama_attrib.evaluation`` end to end on the real model, four short prompts."""
    pytest.importorskip("captum", reason="the baselines need captum (pip install -e .[eval])")
    import json

    from llama_attrib.evaluation.__main__ import main

    out = tmp_path / "run.json"
    argv = ["--categories", "factual,copying,arithmetic,instruction", "--limit", "4", "--steps", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("All prompts: 4 prompts, 8 explained tokens")
    assert printed.count("| method |") == 1 and all(f"| {m} |" in printed for m in [*METHODS, RANDOM])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert [r["category"] for r in saved["records"]] == ["factual", "copying", "arithmetic", "instruction"]
    for record in saved["records"]:
        assert len(record["steps"]) == 2 and record["seconds_total"] > 0
        for step in record["steps"]:
            curves = step["curves"]
            # the end points (full prompt, all replaced) are shared by every order
            assert len({(c["deletion"][0], c["deletion"][-1]) for c in curves.values()}) == 1
            assert all(math.isfinite(v) for c in curves.values() for v in c["deletion"] + c["insertion"])
    for row in saved["table"].values():
        assert all(math.isfinite(row[k]) for k in ("del_aopc_all", "ins_aopc_all", "comp_all", "suff_all"))
    # the saved file prints the same table again
    assert main(["--from", str(out)]) == 0
    assert capsys.readouterr().out.split("\n\n")[1] == printed.split("\n\n")[1]


def test_the_replacement_token_falls_back_to_eos() -> None:
    """Llama 3's tokenizer has neither an unk nor a pad token: the evaluation replaces removed
    tokens with its EOS token instead of failing, and an asked token must exist."""
    from conftest import tiny_tokenizer
    from llama_attrib.evaluation.__main__ import replacement_token

    tokenizer = tiny_tokenizer()
    assert replacement_token(tokenizer) == ("<unk>", tokenizer.unk_token_id)
    tokenizer.unk_token, tokenizer.pad_token = None, None
    assert replacement_token(tokenizer) == ("</s>", tokenizer.eos_token_id)
    assert replacement_token(tokenizer, "<pad>") == ("<pad>", 0)
