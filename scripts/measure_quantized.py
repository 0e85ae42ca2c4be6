"""What quantization does to SmolLM2-135M-Instruct's decomposition: the rounding share, the sum
check, and how far the components move from the float32 model's (README, precision).

    python scripts/measure_quantized.py

SmolLM2's GGUF weights are saved once as an HF folder (float32), then loaded as float32,
bitsandbytes NF4 (its float32 path, and the CPU's bfloat16 kernel where the CPU has one),
LLM.int8 and torchao int8 weight-only. Each explains the same chat answer (the float32
model's, teacher-forced) in target mode.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import llama_attrib
from llama_attrib.models import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from results import save

warnings.filterwarnings("ignore")
PROMPT = "What is the capital of France?"
VARIANTS = ("float32", "4-bit NF4, float32 path", "4-bit NF4, CPU kernel", "8-bit (LLM.int8)", "torchao int8")


def folder() -> Path:
    path = Path(tempfile.gettempdir()) / "llama_attrib_smollm2_hf"
    if not (path / "config.json").exists():
        from transformers import AutoModelForCausalLM

        model, tokenizer = load(dtype="float32")  # GGUF, dequantized on loading
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # its weights are plain float32 tensors now
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def variant(path: Path, how: str) -> torch.nn.Module:
    if how == "torchao int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model, _ = load(str(path), dtype="float32")
        quantize_(model, Int8WeightOnlyConfig())
        return model
    quantization = {"float32": None, "8-bit (LLM.int8)": "8bit"}.get(how, "4bit")
    model, _ = load(str(path), dtype="float32", quantization=quantization)
    if how == "4-bit NF4, float32 path":
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also save the records, with date, commit, machine and command, here")
    args = parser.parse_args()
    records = []
    path = folder()
    model, tokenizer = load(str(path), dtype="float32")
    base = llama_attrib.attribute(model, tokenizer, PROMPT, max_new_tokens=8, chat=True)
    response = tokenizer.decode(base.token_ids[base.prompt_length :])
    print(f"answer: {response!r}\n")
    columns = [
        "weights",
        "sum check (/ logit)",
        "rounding share (/ logit)",
        "components vs float32",
        "top source",
    ]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for how in VARIANTS:
        result = llama_attrib.attribute(variant(path, how), tokenizer, PROMPT, chat=True, response=response)
        scale = np.abs(result.logits)
        total = np.nansum(result.token_scores.astype(np.float64), 1) + result.no_token
        sums = float(np.max(np.abs(total - result.logits) / scale))
        rounding = float(np.max(np.abs(result.rounding) / scale))
        a, b = np.nan_to_num(result.token_scores[:, 1:]), np.nan_to_num(base.token_scores[:, 1:])
        moved = float(np.abs(a - b).max() / np.abs(b).max())
        same = float(np.mean(a.argmax(1) == b.argmax(1)))
        print(f"| {how} | {sums:.1e} | {rounding:.1e} | {moved:.1e} | {same:.0%} of steps |")
        records.append({"weights": how, "sums": sums, "rounding": rounding, "moved": moved, "same_top": same})
    if args.json:
        save(args.json, records, response=response)


if __name__ == "__main__":
    main()
