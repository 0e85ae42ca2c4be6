"""Largest float32 errors the run-time guards see on correct code (justifies their tolerance).

    python scripts/measure_guards.py

Forward mode: |sum of components + bias share - real final hidden state| / max |real|, for
generation and decompose_sequence. Target mode: |sum of contributions + bias share - the stock
model's logit| / max |stock logits|. On every tiny configuration of the tests, every family,
and SmolLM2-135M-Instruct (a chat prompt, 8 tokens).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import llama_attrib
from llama_attrib import adapters, engines
from llama_attrib.checks import completeness_error

worst = {"forward": 0.0, "target": 0.0}


def forward_probe(real: torch.Tensor, comps: torch.Tensor) -> float:
    err = completeness_error(real, comps)
    worst["forward"] = max(worst["forward"], err)
    return err


adapters.forward.completeness_error = forward_probe  # type: ignore[attr-defined]
engines.forward.completeness_error = forward_probe  # type: ignore[attr-defined]
check = engines.TargetComposition.check


def target_probe(self: engines.TargetComposition) -> None:
    logits = self._run.stock_logits()[:, self._step]
    for (row, what), comps in self._known.items():
        value = logits[row, what[0]] - logits[row, what[1]] if isinstance(what, tuple) else logits[row, what]
        err = abs(float(comps.sum()) - float(value)) / float(logits[row].abs().max())
        worst["target"] = max(worst["target"], err)
    check(self)


engines.TargetComposition.check = target_probe  # type: ignore[method-assign]


def main() -> None:
    from conftest import CONFIGS_FOR_GUARDS, prompt, tiny_model
    from test_families import FAMILIES, family_model

    gen = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True}
    models = [tiny_model(kv, rope, tied, attn) for kv, rope, tied, attn in CONFIGS_FOR_GUARDS]
    models += [family_model(name) for name in FAMILIES]
    for model in models:
        llama_attrib.wrap(model)
        for mode in ("target", "forward"):
            for length in (9, 40):
                model.generate(prompt(length), decompose=mode, **gen)
        llama_attrib.unwrap(model)
    from llama_attrib.models import load

    model, tokenizer = load()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with llama_attrib.decompose(model):
        for mode in ("target", "forward"):
            model.generate(ids, decompose=mode, **gen, pad_token_id=tokenizer.eos_token_id)
    print(f"forward mode, final hidden state: largest relative error {worst['forward']:.2e}")
    print(f"target mode, against the stock logits: largest relative error {worst['target']:.2e}")


if __name__ == "__main__":
    main()
