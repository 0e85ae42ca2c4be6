"""What llama_attrib.flow costs on SmolLM2-135M-Instruct, against a plain forward and the
per-token decomposition of the same logit, in the same process.

    python benchmarks/flow_cost.py [--lengths 40,256,1024]

Random prompts of each length after a chat question; the logit explained is the argmax at the
last position. Prints a Markdown table (seconds, best of 2; peak RSS growth is not measured
here: flow is one forward-mode pass, whose memory is forward mode's, see bench.py).
"""

from __future__ import annotations

import argparse
import time

import torch
from results import save  # benchmarks/results.py, beside this script

import llama_attrib
from llama_attrib.models import load


def best(fn, repeat: int = 2) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="40,256,1024")
    parser.add_argument("--json", help="also save the records, with date, commit, machine and command, here")
    args = parser.parse_args()
    model, _ = load()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, SmolLM2-135M-Instruct (30 layers, 9 heads)\n")
    print("| prompt | plain forward | per-token (target) | per-token (forward) | flow | flow / plain |")
    print("|---|---|---|---|---|---|")
    records = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            plain = best(lambda ids=ids: model(ids))
        target = best(lambda ids=ids: llama_attrib.decompose_sequence(model, ids))
        forward = best(lambda ids=ids: llama_attrib.decompose_sequence(model, ids, mode="forward"))
        flow = best(lambda ids=ids: llama_attrib.flow(model, ids))
        figures = f"{plain:.2f} s | {target:.2f} s | {forward:.2f} s | {flow:.2f} s | {flow / plain:.0f}x"
        print(f"| {length} | {figures} |", flush=True)
        records.append({"prompt": length, "plain": plain, "target": target, "forward": forward, "flow": flow})
    if args.json:
        save(args.json, records)


if __name__ == "__main__":
    main()
