"""``llama-attrib "prompt"``: decompose a generation and print, for every generated token,
the contribution of every earlier token to its logit."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from .api import wrap
from .models import load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-attrib", description=__doc__)
    p.add_argument("prompt", help="the prompt (a user message with --chat)")
    p.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--top", type=int, default=0, help="show only the N largest contributors")
    return p


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: torch.Tensor = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return ids
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


def format_step(tokens: Sequence[str], scores: torch.Tensor, top: int = 0) -> list[str]:
    """One row per source token, ``position  token  contribution``, largest first if ``top``."""
    order = list(range(len(tokens)))
    if top:
        order = scores.abs().argsort(descending=True)[:top].tolist()
    return [f"  {i:5d}  {tokens[i]!r:>16}  {float(scores[i]):+9.4f}" for i in order]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    model, tokenizer = load(args.model)
    wrap(model)
    ids = _prompt_ids(tokenizer, args.prompt, args.chat)
    out = model.generate(
        ids,
        decompose=True,
        use_cache=True,
        return_dict_in_generate=True,
        output_attentions=True,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    sequence = out.sequences[0]
    tokens = [tokenizer.decode([t]) for t in sequence.tolist()]
    print(f"prompt ({ids.shape[1]} tokens): {tokenizer.decode(ids[0])!r}")
    print(f"generated: {tokenizer.decode(sequence[ids.shape[1] :])!r}\n")
    for step, c in enumerate(out["attentions"]):
        pred = c.recovery.argmax(dim=0)
        scores = c[pred].components
        print(
            f"step {step}: {tokenizer.decode(pred)!r}  logit {float(c.logits[pred]):.4f} "
            f"= sum of {len(scores)} contributions {float(scores.sum()):.4f}"
        )
        print("\n".join(format_step(tokens, scores, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
