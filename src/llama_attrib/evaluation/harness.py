"""The faithfulness harness: every method on every prompt, scored by the same curves."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import metrics
from .methods import DERIVED, METHODS, Setup
from .prompts import Encoded, Prompt

RANDOM = "random"


@dataclass
class Config:
    methods: list[str]
    steps: int = 3  # generated tokens explained per prompt
    long_steps: int = 1  # ... for the long prompts
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.5])
    fixed: float = 0.2  # comprehensiveness and sufficiency are reported at this fraction
    ig_steps: int = 6
    ablation_tokens: int = 96
    seed: int = 0


def continue_greedy(model: nn.Module, ids: Tensor, steps: int, eos: int | None) -> Tensor:
    """``ids`` followed by ``steps`` greedy tokens of the plain model, ``[P + steps]``."""
    lm: Any = model
    out = lm.generate(
        ids[None], max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=eos
    )
    sequence: Tensor = out[0, : len(ids) + steps]
    return sequence


def attribute(
    model: nn.Module, ids: Tensor, prompt_length: int, setup: Setup, methods: Sequence[str]
) -> tuple[dict[str, list[Tensor]], dict[str, float]]:
    """Scores of every method (one ``[P + k]`` tensor per step) and seconds per step."""
    scores: dict[str, list[Tensor]] = {}
    seconds: dict[str, float] = {}
    steps = len(ids) - prompt_length
    for name in methods:
        if name in DERIVED and DERIVED[name][0] in scores:
            base, derive = DERIVED[name]
            scores[name], seconds[name] = [derive(s) for s in scores[base]], seconds[base]
            continue
        start = time.perf_counter()
        scores[name] = METHODS[name](model, ids, prompt_length, setup)
        seconds[name] = (time.perf_counter() - start) / steps
    return scores, seconds


def evaluate_prompt(
    model: nn.Module,
    prompt: Prompt,
    encoded: Encoded,
    setup: Setup,
    config: Config,
    decode: Callable[[int], str],
    eos: int | None = None,
) -> dict[str, Any]:
    """Everything measured on one prompt, as a JSON-ready record."""
    steps = config.long_steps if prompt.category == "long" else config.steps
    prompt_length = len(encoded.ids)
    ids = continue_greedy(model, encoded.ids, steps, eos)
    setup.token_texts = [decode(int(t)) for t in ids]
    scores, seconds = attribute(model, ids, prompt_length, setup, config.methods)
    record: dict[str, Any] = {"id": prompt.id, "category": prompt.category, "seconds": seconds}
    record["steps"] = []
    for k in range(steps):
        prefix, target = ids[: prompt_length + k], int(ids[prompt_length + k])
        generator = torch.Generator().manual_seed(config.seed * 100003 + hash_id(prompt.id) * 31 + k)
        orders = {name: metrics.ranking(s[k]) for name, s in scores.items()}
        orders[RANDOM] = torch.randperm(len(prefix), generator=generator)
        curves = metrics.curves(
            metrics.logprob_fn(model, target), prefix, orders, config.fractions, setup.replacement
        )
        record["steps"].append(
            {"target": target, "token": decode(target), "curves": {n: vars(c) for n, c in curves.items()}}
        )
    if encoded.source_positions and prompt.answer is not None:
        first = decode(int(ids[prompt_length])).strip()
        record["answer_matches"] = bool(first) and prompt.answer.strip().startswith(first)
        if record["answer_matches"]:
            record["span_rank"] = {
                name: metrics.span_rank(s[0], encoded.source_positions) for name, s in scores.items()
            }
            record["span_rank"][RANDOM] = metrics.span_rank(
                random_scores(len(encoded.ids), config.seed, prompt.id), encoded.source_positions
            )
    return record


def hash_id(text: str) -> int:
    """A stable (not per-process salted) small hash of a prompt id."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % 1_000_003


def random_scores(length: int, seed: int, prompt_id: str) -> Tensor:
    """Random scores for the span rank of the random baseline (seeded per prompt)."""
    generator = torch.Generator().manual_seed(seed * 100003 + hash_id(prompt_id) * 31 + 7)
    return torch.rand(length, generator=generator)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(records: list[dict[str, Any]], config: Config) -> dict[str, dict[str, float]]:
    """Per method (and random): the table's columns, averaged over prompts and steps."""
    names = [*config.methods, RANDOM]
    table: dict[str, dict[str, float]] = {}
    for name in names:
        first = [metrics.Curves(**r["steps"][0]["curves"][name]) for r in records]
        every = [metrics.Curves(**s["curves"][name]) for r in records for s in r["steps"]]
        ranks = [r["span_rank"][name] for r in records if "span_rank" in r]
        row = {
            "del_aopc_first": _mean([c.aopc_deletion() for c in first]),
            "del_aopc_all": _mean([c.aopc_deletion() for c in every]),
            "ins_aopc_first": _mean([c.aopc_insertion() for c in first]),
            "ins_aopc_all": _mean([c.aopc_insertion() for c in every]),
            "comp_all": _mean([c.comprehensiveness(config.fixed) for c in every]),
            "suff_all": _mean([c.sufficiency(config.fixed) for c in every]),
            "span_mrr": _mean([1.0 / r for r in ranks]),
            "span_hit1": _mean([float(r == 1) for r in ranks]),
            "seconds": _mean([r["seconds"][name] for r in records]) if name != RANDOM else 0.0,
        }
        table[name] = row
    return table


COLUMNS = [
    ("del_aopc_first", "del AOPC 1st ↑"),
    ("del_aopc_all", "del AOPC all ↑"),
    ("ins_aopc_first", "ins AOPC 1st ↑"),
    ("ins_aopc_all", "ins AOPC all ↑"),
    ("comp_all", "comp@{f} ↑"),
    ("suff_all", "suff@{f} ↓"),
    ("span_mrr", "span MRR ↑"),
    ("span_hit1", "span hit@1 ↑"),
    ("seconds", "s / attribution"),
]


def format_table(table: dict[str, dict[str, float]], config: Config) -> str:
    """A Markdown table, one row per method."""
    pct = f"{round(config.fixed * 100)}%"
    head = ["method", *(title.format(f=pct) for _, title in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        cells = [f"{row[key]:.3f}" if key != "seconds" else f"{row[key]:.2f}" for key, _ in COLUMNS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def report(records: list[dict[str, Any]], config: Config) -> str:
    """The whole printout: one table for all prompts, then one for the prompts that are not
    long and one for the long prompts (when both kinds were run), each with its counts."""
    groups = [("All prompts", records)]
    short = [r for r in records if r["category"] != "long"]
    long = [r for r in records if r["category"] == "long"]
    if short and long:
        groups += [("Prompts that are not long", short), ("Long prompts", long)]
    parts = []
    for title, group in groups:
        explained = sum(len(r["steps"]) for r in group)
        ranked = sum("span_rank" in r for r in group)
        with_span = sum("answer_matches" in r for r in group)
        seconds = sum(r.get("seconds_total", 0.0) for r in group)
        head = (
            f"{title}: {len(group)} prompts, {explained} explained tokens, span rank on {ranked} of "
            f"{with_span} prompts with a source span (those whose first generated token is the answer)"
        )
        if seconds:
            head += f", {seconds / 60:.1f} min"
        parts.append(head + "\n\n" + format_table(summarize(group, config), config))
    return "\n\n".join(parts)
