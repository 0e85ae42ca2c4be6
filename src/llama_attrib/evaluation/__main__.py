"""``python -m llama_attrib.evaluation``: run the faithfulness evaluation and print the table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .._saving import provenance
from ..models import load
from .harness import Config, evaluate_prompt, report, summarize
from .methods import LXT_METHODS, METHODS, Setup, check_lxt
from .prompts import encode, load_prompts, spread


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama_attrib.evaluation", description=__doc__)
    p.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", help="a JSONL prompt file (default: the shipped prompt set)")
    p.add_argument("--limit", type=int, help="at most N prompts, taken round-robin over categories")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated, from: "
        + ", ".join([*METHODS, *LXT_METHODS])
        + " (LXT's: in a run of their own)",
    )
    p.add_argument("--steps", type=int, default=3, help="generated tokens explained per prompt")
    p.add_argument("--long-steps", type=int, default=1, help="generated tokens explained per long prompt")
    p.add_argument("--ig-steps", type=int, default=6, help="integrated-gradients steps")
    p.add_argument("--fractions", default="0.1,0.2,0.5", help="curve points (fractions removed)")
    p.add_argument("--fixed", type=float, default=0.2, help="fraction for comprehensiveness/sufficiency")
    p.add_argument("--ablation-tokens", type=int, default=96, help="ablate sentences above this length")
    p.add_argument("--replacement", help="token that replaces a removed token (default: the unk token)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--categories", help="comma-separated categories to run (default: all)")
    p.add_argument(
        "--from",
        dest="saved",
        nargs="+",
        help="print the table of saved --out files (their records pooled) instead of running",
    )
    p.add_argument("--out", help="write every record and the table to this JSON file")
    return p


def _print_saved(paths: Sequence[str], config: Config) -> int:
    """The table of saved runs, their records pooled (their settings must match)."""
    records: list[dict[str, object]] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        records += saved["records"]
        config = Config(**saved["config"])
    print(report(records, config))
    print(f"\n{len(records)} prompts from {', '.join(paths)}")
    return 0


def replacement_token(tokenizer: Any, asked: str | None = None) -> tuple[str, int]:
    """The token a removed token is replaced by, and its id: the one asked for, else the
    tokenizer's unk, pad or EOS token (Llama 3 has neither unk nor pad)."""
    for token in (asked, tokenizer.unk_token, tokenizer.pad_token, tokenizer.eos_token):
        if token:
            found = tokenizer.convert_tokens_to_ids(token)
            if found is None or (asked and found == tokenizer.unk_token_id and token != tokenizer.unk_token):
                raise SystemExit(f"--replacement {token!r} is not a token of this tokenizer")
            return str(token), int(found)
    raise SystemExit("this tokenizer has no unk, pad or EOS token: give --replacement TOKEN")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS and m not in LXT_METHODS]
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)}")
    check_lxt(methods)
    METHODS.update({m: LXT_METHODS[m] for m in methods if m in LXT_METHODS})
    config = Config(
        methods=methods,
        steps=args.steps,
        long_steps=args.long_steps,
        fractions=[float(f) for f in args.fractions.split(",")],
        fixed=args.fixed,
        ig_steps=args.ig_steps,
        ablation_tokens=args.ablation_tokens,
        seed=args.seed,
    )
    if args.saved:
        return _print_saved(args.saved, config)
    if config.fixed not in config.fractions:
        raise SystemExit(f"--fixed {config.fixed} must be one of --fractions")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load(args.model)
    model.requires_grad_(False)
    token, replacement = replacement_token(tokenizer, args.replacement)
    setup = Setup(replacement=replacement, ig_steps=config.ig_steps, ablation_tokens=config.ablation_tokens)
    prompts = load_prompts(args.prompts)
    if args.categories:
        prompts = [p for p in prompts if p.category in args.categories.split(",")]
    prompts = spread(prompts, args.limit)
    records = []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        record = evaluate_prompt(
            model,
            prompt,
            encode(prompt, tokenizer),
            setup,
            config,
            lambda t: str(tokenizer.decode([t])),
            eos=tokenizer.eos_token_id,
        )
        record["seconds_total"] = time.perf_counter() - t0
        records.append(record)
        print(f"[{i + 1}/{len(prompts)}] {prompt.id}: {record['seconds_total']:.1f} s", file=sys.stderr)
    table = summarize(records, config)
    elapsed = time.perf_counter() - started
    print(report(records, config))
    print(
        f"\n{len(prompts)} prompts, replacement token {token!r}, torch threads "
        f"{torch.get_num_threads()}, total {elapsed / 60:.1f} min"
    )

    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "meta": provenance(),
                    "config": vars(config),
                    "replacement": token,
                    "seconds_total": elapsed,
                    "table": table,
                    "records": records,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
