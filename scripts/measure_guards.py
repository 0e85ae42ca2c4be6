"""Largest errors the run-time guards see on correct code (justifies their tolerances).

    python scripts/measure_guards.py                 # float32: every tiny configuration and family
    python scripts/measure_guards.py --half          # SmolLM2 and a 128k-vocabulary shape in
                                                     # float32, bfloat16 and float16

The guards and what each measures:
- forward: |sum of components + bias share - real final hidden state| / max |real|, for
  generation and decompose_sequence;
- target: |sum of contributions + shares of no token - the stock model's logit| / max |stock
  logits| (generate's every step, decompose_sequence);
- replay: |a decoder layer run again in target mode's sweep - its recorded output| / max |output|.
Each is compared with its tolerance (``checks.tolerance``: float32 1e-5, half precision 5e-2).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from results import save  # benchmarks/results.py

import llama_attrib
from llama_attrib import engines, sweep
from llama_attrib.checks import completeness_error, tolerance

worst: dict[tuple[str, str], float] = defaultdict(float)
case = ["float32"]  # the label the probes file their errors under


def probe(guard: str) -> Any:
    def measured(real: torch.Tensor, comps: torch.Tensor) -> float:
        err = completeness_error(real, comps)
        worst[(case[0], guard)] = max(worst[(case[0], guard)], err)
        return err

    return measured


engines.forward.completeness_error = probe("forward")  # type: ignore[attr-defined]
sweep.completeness_error = probe("replay")  # type: ignore[attr-defined]
check = engines.TargetComposition.check


def target_probe(self: engines.TargetComposition) -> None:
    logits = self._run.stock_logits()[:, self._step]
    for (row, target), comps in self._known.items():
        value = target.value(logits[row : row + 1])[0]
        err = abs(float(comps.sum()) - float(value)) / float(logits[row].abs().max())
        worst[(case[0], "target")] = max(worst[(case[0], "target")], err)
    check(self)


engines.TargetComposition.check = target_probe  # type: ignore[method-assign]
GEN = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True}


def tiny_models() -> None:
    from conftest import CONFIGS_FOR_GUARDS, prompt, tiny_model
    from test_families import FAMILIES, family_model

    models = [tiny_model(kv, rope, tied, attn) for kv, rope, tied, attn in CONFIGS_FOR_GUARDS]
    models += [family_model(name) for name in FAMILIES]
    for model in models:
        llama_attrib.wrap(model)
        for mode in ("target", "forward"):
            for length in (9, 40):
                model.generate(prompt(length), decompose=mode, **GEN)
        llama_attrib.unwrap(model)


def smollm2(dtype: str, document_tokens: int) -> None:
    """A chat answer in both modes, and the teacher-forced answer to a long document."""
    from llama_attrib.models import load

    model, tokenizer = load(dtype=dtype)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with llama_attrib.decompose(model):
        for mode in ("target", "forward"):
            model.generate(ids, decompose=mode, **GEN, pad_token_id=tokenizer.eos_token_id)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from long_documents import document

    long_ids = document(tokenizer, document_tokens)  # the long-document benchmark's document
    llama_attrib.decompose_sequence(model, long_ids, prompt_length=long_ids.shape[1] - 8)


def large_vocabulary(dtype: str) -> None:
    """Llama-3's vocabulary (128256) and rope (llama3) on a narrow random model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip
    torch.manual_seed(0)
    model = llama_attrib.wrap(LlamaForCausalLM(config).to(getattr(torch, dtype)).eval())
    ids = torch.randint(0, 128256, (1, 300), generator=torch.Generator().manual_seed(0))
    for mode in ("target", "forward"):
        model.generate(ids, decompose=mode, **GEN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--half", action="store_true", help="SmolLM2 and a 128k vocabulary, three dtypes")
    parser.add_argument("--document-tokens", type=int, default=1024)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="with --half")
    parser.add_argument("--json", help="also save the records, with date, commit, machine and command, here")
    args = parser.parse_args()
    if args.half:
        for dtype in args.dtypes.split(","):
            case[0] = f"SmolLM2, {dtype}"
            smollm2(dtype, args.document_tokens)
            case[0] = f"128k vocabulary, {dtype}"
            large_vocabulary(dtype)
    else:
        case[0] = "tiny models and families, float32"
        tiny_models()
        case[0] = "SmolLM2, float32"
        smollm2("float32", args.document_tokens)
    print("| case | guard | largest relative error | tolerance | margin |")
    print("|---|---|---|---|---|")
    for (label, guard), err in sorted(worst.items()):
        dtype = getattr(torch, label.rsplit(", ", 1)[1])
        tol = tolerance(dtype)
        print(f"| {label} | {guard} | {err:.2e} | {tol:.0e} | {tol / max(err, 1e-30):.0f}x |")
    if args.json:
        records = [
            {
                "case": label.rsplit(", ", 1)[0],
                "dtype": label.rsplit(", ", 1)[1],
                "guard": guard,
                "error": err,
            }
            for (label, guard), err in sorted(worst.items())
        ]
        save(
            args.json, records, tolerances={d: tolerance(getattr(torch, d)) for d in ("float32", "bfloat16")}
        )


if __name__ == "__main__":
    main()
