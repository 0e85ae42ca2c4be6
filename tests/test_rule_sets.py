"""Rule sets (``rules=``): AttnLRP against LXT's own implementation (run in a subprocess from
the wheel in tests/data/lxt) and against hooks on the stock model written here; every rule
set's exact account (components + bias + rounding + unassigned = the stock logit); the
options everywhere a decomposition is made, and the refusals where the maths does not carry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import llama_attrib
from conftest import credited_factors, gradient_x_input, prompt
from llama_attrib import _compat, rules
from test_families import FAMILIES, GEN, family_model, refused_here

LXT = Path(__file__).resolve().parent / "lxt_reference.py"
LXT_FAMILIES = ["llama", "qwen2", "qwen3", "gemma3_text"]  # the families LXT patches
P = 5  # prompt length of the 9-token sequences


def lxt_relevance(
    model: nn.Module, ids: torch.Tensor, targets: list[tuple[int, int]], ruleset: str, where: Path
) -> Any:
    """LXT's relevance ``[n_targets, T]`` and logits ``[n_targets]`` (``ruleset``: attnlrp or cp)."""
    folder = where / "model"
    if not folder.exists():
        model.save_pretrained(folder)
    out = where / f"{ruleset}.pt"
    command = [sys.executable, str(LXT), "--model", str(folder), "--ids", json.dumps(ids[0].tolist())]
    command += ["--rules", ruleset, "--targets", json.dumps(targets), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def explained(model: nn.Module, ids: torch.Tensor, ruleset: Any, p: int = P) -> list[Any]:
    """Each step's Contributions to the next token's logit (teacher-forced after ``p`` tokens)."""
    steps = llama_attrib.decompose_sequence(model, ids[0], p, rules=ruleset)
    return [c[int(ids[0, p + k])] for k, c in enumerate(steps)]


def targets_of(ids: torch.Tensor, p: int = P) -> list[tuple[int, int]]:
    """The ``(position, token)`` pairs :func:`explained` explains."""
    return [(p - 1 + k, int(ids[0, p + k])) for k in range(ids.shape[1] - p)]


@pytest.mark.parametrize("name", LXT_FAMILIES)
def test_attnlrp_equals_lxt_and_exact_equals_cp_lrp(name: str, tmp_path: Path) -> None:
    model = family_model(name)
    ids = prompt(9)
    for ours, theirs in (("attnlrp", "attnlrp"), ("exact", "cp")):
        got = explained(model, ids, ours)
        ref = lxt_relevance(model, ids, targets_of(ids), theirs, tmp_path)
        for k, c in enumerate(got):
            relevance = ref["relevance"][k]
            scale = float(relevance.abs().max())
            n = P + k
            assert float(relevance[n:].abs().max()) == 0.0  # nothing flows backwards
            err = float((c.components - relevance[:n]).abs().max())
            assert err <= 1e-5 * scale, (name, ours, k, err / scale)
            total = float(c.components.sum() + c.residual)
            logit = float(ref["logits"][k])
            assert abs(total - logit) <= 1e-5 * max(scale, abs(logit)), (name, ours, k)
        if ours == "attnlrp":  # AttnLRP does not conserve: the softmax keeps some of the logit
            assert max(abs(float(c.shares["unassigned"])) for c in got) > 1e-3


@pytest.mark.parametrize("normalised", [False, True])
def test_attnlrp_on_a_mixture_of_experts_equals_lxt(normalised: bool, tmp_path: Path) -> None:
    """Qwen3-MoE (LXT's MoE model, transformers 5): each expert's gate x up and each routing
    weight x its expert's output half to each side, the router's softmax differentiated at the
    real logits (LXT leaves it to autograd); with the chosen weights renormalised and without."""
    if _compat.TRANSFORMERS_VERSION.major < 5:
        pytest.skip("LXT patches Qwen3MoeExperts, a transformers 5 class (tests/data/lxt/README.md)")
    model = family_model("qwen3_moe")
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.norm_topk_prob = normalised
    model.config.norm_topk_prob = normalised  # what LXT's copy is built with
    ids = prompt(9)
    got = explained(model, ids, "attnlrp")
    ref = lxt_relevance(model, ids, targets_of(ids), "attnlrp", tmp_path)
    for k, c in enumerate(got):
        relevance = ref["relevance"][k]
        scale = float(relevance.abs().max())
        err = float((c.components - relevance[: P + k]).abs().max())
        assert err <= 1e-5 * scale, (normalised, k, err / scale)
        logit = float(ref["logits"][k])
        assert abs(float(c.components.sum() + c.residual) - logit) <= 1e-5 * max(scale, abs(logit))
    # the router's softmax keeps some of the logit: unassigned, never a token's
    assert max(abs(float(c.shares["unassigned"])) for c in got) > 1e-3


@pytest.mark.slow
def test_attnlrp_equals_lxt_on_smollm2(smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = smollm2
    plain = type(model)(model.config)  # a GGUF-loaded model does not save: a plain copy of it does
    plain.load_state_dict(model.state_dict())
    text = "Alice's code is 4821 and Bob's is 7730. Alice's code is 4821"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    p = ids.shape[1] - 4  # the repeated code, teacher-forced
    got = explained(model, ids, "attnlrp", p)
    ref = lxt_relevance(plain.eval(), ids, targets_of(ids, p), "attnlrp", tmp_path)
    del plain
    for k, c in enumerate(got):
        relevance = ref["relevance"][k]
        scale = float(relevance.abs().max())
        err = float((c.components - relevance[: len(c.components)]).abs().max())
        assert err <= 1e-5 * scale, (k, err / scale)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_attnlrp_matches_hooks_on_the_stock_model(name: str) -> None:
    """Every family: components against gradient x input with AttnLRP's rules as hooks (the
    mixtures of experts' routers, experts and shared experts too, conftest.credited_factors);
    what no token got (bias + unassigned) against the rest."""
    model = family_model(name)
    if refused_here(name):
        pytest.skip(f"{refused_here(name)}: refused (tests/test_families.py)")
    if name == "gemma2":
        # the hooks differentiate a soft-cap as it is, the rule set by the identity rule: compare
        # without it here (the exact account with it is tested below)
        for module in model.modules():
            if hasattr(module, "attn_logit_softcapping"):
                module.attn_logit_softcapping = None
    ids = prompt(9)
    for k, c in enumerate(explained(model, ids, "attnlrp")):
        token = int(ids[0, P + k])
        components, rest, logit = gradient_x_input(model, ids[:, : P + k], token, factors=credited_factors)
        scale = float(components.abs().max())
        assert torch.allclose(c.components, components, atol=1e-5 * scale, rtol=0), (name, k)
        assert abs(float(c.residual) - rest) <= 1e-5 * max(scale, abs(logit))
        assert abs(float(c.components.sum() + c.residual) - logit) <= 1e-5 * max(scale, abs(logit))
        if name in ("qwen2", "gpt2", "gpt_neox"):  # biases: their share is not the unassigned one
            assert abs(float(c.shares["bias"])) > 1e-4


@pytest.mark.parametrize("ruleset", sorted(rules.RULE_SETS))
@pytest.mark.parametrize("name", ["gemma2", "mistral", "phi3", "gpt2", "mixtral", "deepseek_v3"])
def test_every_rule_set_keeps_an_exact_account(name: str, ruleset: str) -> None:
    """components + bias + rounding + unassigned = the stock logit (Gemma 2 with its soft-caps,
    sliding windows shorter than the prompt), generate's tokens unchanged, and generate's
    decomposition equal to decompose_sequence's."""
    model = family_model(name)
    ids = prompt(9)
    plain = model.generate(ids, **GEN, output_logits=True)
    with llama_attrib.decompose(model, rules=ruleset):
        out = model.generate(ids, decompose=True, **GEN)
    assert torch.equal(out.sequences, plain.sequences)
    assert not llama_attrib.is_wrapped(model)
    again = llama_attrib.decompose_sequence(model, out.sequences[0], 9, rules=ruleset)
    for k, c in enumerate(out["attentions"]):
        token = int(out.sequences[0, 9 + k])
        got = c[token]
        logit = gradient_x_input(model, out.sequences[:, : 9 + k], token)[2]  # before a soft-cap
        scale = float(plain.logits[k][0].abs().max())
        parts = float(got.components.sum()) + sum(float(v) for v in got.shares.values())
        assert abs(parts - logit) <= 1e-5 * scale, (name, ruleset, k)
        assert torch.allclose(again[k][token].components, got.components, atol=1e-5 * scale, rtol=0)
        unassigned = abs(float(got.shares["unassigned"]))
        if ruleset == "exact":
            assert unassigned == 0.0
        elif ruleset == "attnlrp":
            assert unassigned > 1e-4


def test_probability_blocks_do_not_change_attnlrp(monkeypatch: pytest.MonkeyPatch) -> None:
    """One query row per block (forward and backward) gives what whole blocks give."""
    model = family_model("qwen2")
    ids = prompt(9)
    whole = explained(model, ids, "attnlrp")
    monkeypatch.setattr(rules.scores, "BLOCK_BYTES", 64)
    for a, b in zip(explained(model, ids, "attnlrp"), whole, strict=True):
        scale = float(b.components.abs().max())
        assert float((a.components - b.components).abs().max()) <= 1e-6 * scale
        assert abs(float(a.residual - b.residual)) <= 1e-6 * scale


def test_half_precision_model() -> None:
    """A bfloat16 model's float32 components against float32 arithmetic on the same (rounded)
    weights: what is left is the bfloat16 forward's own rounding of its hidden states (measured
    1.6e-2 of the largest component on Llama, 2.9e-2 on Qwen2's biases; on GPT-OSS, DeepSeek-V3
    and Granite 4.0's hybrid 1.3e-2, 2.0e-2 and 2.4e-2 on transformers 5.24, 4.6e-2, 5.0e-2 and
    5.1e-2 on 4.57, whose tiny models draw other weights; bound at about twice that)."""
    ids = prompt(9)
    bounds = (("llama", 3.5e-2), ("qwen2", 6e-2), ("gpt_oss", 9e-2), ("deepseek_v3", 0.1))
    for name, bound in (*bounds, ("granitemoehybrid", 0.1)):
        model = family_model(name).to(torch.bfloat16)
        got = explained(model, ids, "attnlrp")
        reference = explained(family_model(name).to(torch.bfloat16).float(), ids, "attnlrp")
        for a, b in zip(got, reference, strict=True):
            scale = float(b.components.abs().max())
            assert a.components.dtype == torch.float32
            assert float((a.components - b.components).abs().max()) <= bound * scale, name


def test_the_options_and_the_defaults() -> None:
    model = family_model("llama")
    ids = prompt(9)
    exact = explained(model, ids, "exact")
    attnlrp = explained(model, ids, "attnlrp")
    assert float((exact[0].components - attnlrp[0].components).abs().max()) > 1e-3
    llama_attrib.wrap(model, rules="attnlrp")
    try:
        # the wrapped model's rule set is the default of every entry point; a call's own wins
        assert torch.equal(explained(model, ids, None)[0].components, attnlrp[0].components)  # type: ignore[arg-type]
        assert torch.equal(explained(model, ids, "exact")[0].components, exact[0].components)
        answer = llama_attrib.decompose_answer(model, ids[0], P)
        assert abs(float(answer.shares["unassigned"])) > 1e-4
        with llama_attrib.decompose(model, rules="exact"):
            assert torch.equal(explained(model, ids, None)[0].components, exact[0].components)  # type: ignore[arg-type]
        assert torch.equal(explained(model, ids, None)[0].components, attnlrp[0].components)  # type: ignore[arg-type]
    finally:
        llama_attrib.unwrap(model)
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="choose one of"):
        llama_attrib.decompose_sequence(model, ids[0], P, rules="lrp")


def test_refusals_leave_the_model_as_it_was() -> None:
    model = family_model("llama")
    ids = prompt(9)
    before = model(ids).logits
    message = "forward mode and flow"
    with pytest.raises(llama_attrib.UnsupportedOptionError, match=message):
        llama_attrib.decompose_sequence(model, ids[0], P, mode="forward", rules="attnlrp")
    with pytest.raises(llama_attrib.UnsupportedOptionError, match=message):
        llama_attrib.flow(model, ids[0], rules="attnlrp")
    llama_attrib.wrap(model, rules="attnlrp")
    try:
        with pytest.raises(llama_attrib.UnsupportedOptionError, match=message):
            model.generate(ids, decompose="forward", **GEN)
        with pytest.raises(llama_attrib.UnsupportedOptionError, match=message):
            model(ids, decompose=True)
    finally:
        llama_attrib.unwrap(model)
    assert not llama_attrib.is_wrapped(model)
    assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_a_rule_set_without_a_rule_for_a_module_refuses_before_any_work(name: str) -> None:
    """A mixture of experts under a rule set whose map has no rule for a SparseMoE (AttnLRP's
    without it): wrap, a decompose block, generate and decompose_sequence refuse before the model
    runs once, naming the module, and the model is left as it was."""
    lacking = rules.RuleSet(
        "attnlrp-dense", {k: v for k, v in rules.ATTNLRP.by_kind.items() if k is not rules.mlp.SparseMoE}
    )
    moe = family_model(name)
    ids = prompt(9)
    before = moe(ids).logits
    calls: list[int] = []
    handle = moe.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    message = "SparseMoE\\) has no rule for its gate"
    try:
        with pytest.raises(llama_attrib.UnsupportedOptionError, match=message):
            llama_attrib.wrap(moe, rules=lacking)
        assert not llama_attrib.is_wrapped(moe)
        with (
            pytest.raises(llama_attrib.UnsupportedOptionError, match=message),
            llama_attrib.decompose(moe, rules=lacking),
        ):
            pass
        with pytest.raises(llama_attrib.UnsupportedOptionError, match=message):
            llama_attrib.decompose_sequence(moe, ids[0], P, rules=lacking)
        llama_attrib.wrap(moe)
        with pytest.raises(llama_attrib.UnsupportedOptionError, match=message):
            moe.generate(ids, decompose=True, rules=lacking, **GEN)
        llama_attrib.unwrap(moe)
        assert calls == []
    finally:
        handle.remove()
    assert not llama_attrib.is_wrapped(moe) and torch.equal(moe(ids).logits, before)


def test_the_path_rule_set_loses_only_what_its_midpoints_miss() -> None:
    """attnlrp-path passes the probabilities' share on along the path from uniform attention:
    what it leaves unassigned is the midpoint rule's error, which shrinks with the square of the
    steps, and is far below AttnLRP's at the real scores alone."""
    model = family_model("gemma2")  # soft-caps and sliding windows too
    ids = prompt(9)
    attnlrp = explained(model, ids, "attnlrp")
    lost = {}
    for steps in (4, 32, 64):
        chosen = rules.sets.PATH.with_rule(rules.sets.ATTENTION, rules.sets.Credited(path=steps))
        lost[steps] = max(abs(float(c.shares["unassigned"])) for c in explained(model, ids, chosen))  # type: ignore[arg-type]
    # the midpoint rule is of second order: 8x the steps take 64x off (measured 93x from 4 to 32
    # steps, 4.03x from 32 to 64); a first-order rule (left ends) takes 8x and 2x
    assert lost[32] < lost[4] / 32 and lost[64] < lost[32] / 3, lost
    assert lost[4] < max(abs(float(c.shares["unassigned"])) for c in attnlrp) / 4


def test_the_evaluation_has_every_rule_set_and_runs_lxt_alone() -> None:
    from llama_attrib.evaluation.methods import LXT_METHODS, METHODS, check_lxt

    for name in rules.RULE_SETS:
        if name != "exact":
            assert name in METHODS and f"{name}-no-first" in METHODS
        assert f"{name}-logprob" in METHODS and f"{name}-logprob-no-first" in METHODS
    assert not set(LXT_METHODS) & set(METHODS)  # they patch the process: only when asked for
    check_lxt(["lxt-attnlrp", "lxt-attnlrp-no-first", "attnlrp", "decomposition"])
    for mixed in (["lxt-attnlrp", "input-x-gradient"], ["lxt-attnlrp", "lxt-cp-lrp"]):
        with pytest.raises(SystemExit, match="whole process"):
            check_lxt(mixed)


@pytest.mark.parametrize("ruleset", ["exact", "attnlrp"])
def test_the_logprob_rows_explain_the_log_probability_target(ruleset: str) -> None:
    """``<rule set>-logprob`` scores the components of the log-probability target (the logit
    minus the probability-weighted mean logit): with the shares of no token they add up to
    it, from the model's own logits; they are not the logit's components."""
    from llama_attrib.evaluation.methods import METHODS, Setup

    model = family_model("qwen2")
    ids = prompt(9)[0]
    scores = METHODS[f"{ruleset}-logprob"](model, ids, P, Setup(replacement=0))
    steps = llama_attrib.decompose_sequence(model, ids, P, targets="logprob", rules=ruleset)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, P - 1 :].double()
    for k, (got, c) in enumerate(zip(scores, steps, strict=True)):
        token = int(ids[P + k])
        z = logits[k]
        value = float(z[token] - torch.softmax(z, -1) @ z)
        share = float(c.logprob(token).residual)
        assert abs(float(got.sum()) + share - value) <= 3e-5 * float(z.abs().max())
        assert not torch.allclose(got, c[token].components.float())


@pytest.mark.slow
def test_lxt_rows_of_the_evaluation_equal_attnlrp_rows(tmp_path: Path) -> None:
    """``python -m llama_attrib.evaluation --methods lxt-attnlrp,attnlrp`` (LXT from the wheel):
    the same rankings, so the same row of figures, on SmolLM2."""
    if _compat.TRANSFORMERS_VERSION.major < 5:
        pytest.skip("LXT's upstream package imports a transformers 5 class (tests/data/lxt/README.md)")
    out = tmp_path / "r.json"
    command = [sys.executable, "-m", "llama_attrib.evaluation", "--methods", "lxt-attnlrp,attnlrp"]
    command += ["--categories", "copying", "--limit", "2", "--steps", "1", "--out", str(out)]
    wheel = next((Path(__file__).parent / "data" / "lxt").glob("lxt-*.whl"))
    env = {**os.environ, "PYTHONPATH": str(wheel)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())["table"]
    assert table["lxt-attnlrp"].keys() == table["attnlrp"].keys()
    for key, value in table["attnlrp"].items():
        if key != "seconds":
            assert table["lxt-attnlrp"][key] == pytest.approx(value, abs=1e-4), key
