"""What ``ranking(k, verify=m)`` costs, with and without reusing the unchanged prefix's cache.

SmolLM2-135M-Instruct answers a question about the Apache License text (this repository's
LICENSE, about 2,400 tokens) in its chat template; the answer's sentences are ranked
(``attribute`` -> ``sentences(within=...)``) and the ``m`` first are verified: the answer's
log-probability with each one's tokens removed. Prints, for each way, the seconds of the
``m + 1`` measured log-probabilities (best of ``--repeat``) and the largest difference between
the two ways' values (they compute the same numbers).

    python benchmarks/verify_cost.py [--m 8] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import llama_attrib
from llama_attrib.models import load
from llama_attrib.verify import answer_logprob

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Under this licence, what must a redistribution of the Work include?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=8, help="sources verified (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="timings per way, best kept (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load()
    document = (ROOT / "LICENSE").read_text(encoding="utf-8")
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTION}"}]
    with torch.enable_grad():
        result = llama_attrib.attribute(model, tokenizer, messages, args.max_new_tokens)
    view = result.sentences(within=result.find(document))
    ranked = view.ranking()[: args.m]
    p = view.prompt_length
    removals = [
        [],
        *([i for i in view.columns[view.sources.index(label)] if i < p] for label, _, _ in ranked),
    ]
    figures: dict[str, object] = {
        "prompt_tokens": p,
        "answer_tokens": result.n_generated,
        "verified": len(ranked),
        "answer": result.generation,
    }
    values = {}
    for way, reuse in (("full forwards, batched", False), ("prefix cache reused", True)):
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            values[way] = answer_logprob(model, view.token_ids, p, removals, reuse=reuse)
            best = min(best, time.perf_counter() - start)
        figures[f"seconds, {way}"] = round(best, 2)
        print(f"{way}: {best:.2f} s for {len(removals)} log-probabilities")
    a, b = values.values()
    difference = max(abs(x - y) for x, y in zip(a, b, strict=True))
    figures["largest difference (nats)"] = difference
    first = [sorted(r)[0] for r in removals[1:] if r]
    figures["mean first removed position / prompt"] = round(sum(first) / len(first) / p, 3) if first else None
    print(f"largest difference between the ways: {difference:.2e} nats")
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
