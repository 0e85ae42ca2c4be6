"""Every table of figures in README.md and docs/, rendered from its saved result file.

    python scripts/docs_tables.py            # rewrite every table in place
    python scripts/docs_tables.py --check    # say which tables differ from their files; exit 1 if any

A table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME is a key of
:data:`TABLES`, which renders it from files under ``benchmarks/`` (written by the benchmark
scripts with ``--json``, :mod:`benchmarks.results`). Each block ends with a line that gives
every file's date, commit, machine and command, so a figure never stands without its source.
``tests/test_docs_tables.py`` runs ``--check`` and fails on a table that is not in a block.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^([ \t]*)<!-- table: ([\w-]+) -->\n(.*?)^[ \t]*<!-- /table -->", re.S | re.M)
MiB = 2**20


class Data:
    """One saved result file: its provenance (``meta``), its records and its other fields."""

    def __init__(self, name: str) -> None:
        self.path = ROOT / "benchmarks" / name
        self.name = name
        text = self.path.read_text()
        if name.endswith(".jsonl"):  # a log: a meta line, then one line per document
            lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
            self.meta = next(line["meta"] for line in lines if "meta" in line)
            self.records = [line for line in lines if "doc" in line]
            self.body: dict[str, Any] = {}
        else:
            self.body = json.loads(text)
            self.meta, self.records = self.body["meta"], self.body["records"]

    def source(self) -> str:
        m = self.meta
        note = f"; {m['note']}" if m.get("note") else ""
        where = f"{m['date']}, commit {m['commit']}, {m['machine']}"
        return f"`benchmarks/{self.name}`: {where}, `{m['command']}`{note}"


@functools.cache
def data(name: str) -> Data:
    return Data(name)


def sources(*names: str) -> str:
    return "\n".join(f"<sub>From {data(n).source()}.</sub><br>" for n in names).removesuffix("<br>")


def table(head: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float, base: float, digits: int = 1) -> str:
    return f"{value / base:.{digits}f}x"


# --- benchmarks/bench.py records (time and peak memory per mode) -----------------------------


def bench_rows(records: list[dict[str, Any]], notes: bool) -> list[list[str]]:
    rows, plain = [], {}
    for r in records:
        case = (r["shape"], r["prompt"], r["new"])
        first = [r["shape"], f"{r['prompt']} + {r['new']}", r["mode"]]
        if r["mode"] == "plain":
            plain[case] = r
        if r["status"] != "ok":
            rows.append(first + [r["status"], "", "", ""] + ([""] if notes else []))
            continue
        p = plain[case]
        figures = [
            f"{r['seconds']:.2f} s",
            ratio(r["seconds"], p["seconds"]),
            f"{r['peak'] / MiB:.0f} MiB",
            ratio(r["peak"], p["peak"], 2),
        ]
        rows.append(first + figures + ([r.get("note", "")] if notes else []))
    return rows


def bench(name: str) -> str:
    records = data(name).records
    notes = any(r.get("note") for r in records)
    head = ["model", "prompt + new", "mode", "time", "vs plain", "peak memory", "vs plain"]
    return table(head + (["note"] if notes else []), bench_rows(records, notes)) + "\n\n" + sources(name)


# --- benchmarks/long_documents.py records (one process per figure) ----------------------------

CASES = {
    "smollm2-4096": "SmolLM2, a document",
    "smollm2-8000": "SmolLM2, a document",
    "issue6-2048": "8 layers, hidden 512, random",
    "smollm2-248": "SmolLM2, short prompt",
}
METHODS = {"llama_attrib": "llama_attrib (exact)", "naive": "a naive loop"}


def method_name(method: str) -> str:
    if method.startswith("rules="):
        return f'llama_attrib, `rules="{method.split("=", 1)[1]}"`'
    if method.startswith("max_memory="):
        return f'llama_attrib, `max_memory="{method.split("=", 1)[1]}"`'
    return METHODS.get(method, method)


def long_rows(names: Iterable[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, plain generation's record in the same run) for every record that ran, in the
    order of :data:`CASES` (each file's order within a case)."""
    rows = []
    for name in names:
        plain: dict[str, dict[str, Any]] = {}
        for r in data(name).records:
            if r["status"] != "ok":
                raise ValueError(f"benchmarks/{name}: {r['case']} {r['method']} {r['status']}")
            plain.setdefault(r["case"], r)
            rows.append((r, plain[r["case"]]))
    order = list(CASES)
    return sorted(
        rows, key=lambda pair: order.index(pair[0]["case"]) if pair[0]["case"] in order else len(order)
    )


def long_documents(*names: str) -> str:
    head = ["case", "prompt + new", "method", "time", "vs plain", "peak", "vs plain", "estimate / growth"]
    rows = []
    for r, p in long_rows(names):
        estimate = f"{r['estimate'] / r['growth']:.2f}" if "estimate" in r else ""
        rows.append(
            [
                CASES.get(r["case"], r["case"]),
                f"{r['prompt']} + {r['new']}",
                "plain generation" if r["method"] == "plain" else method_name(r["method"]),
                f"{r['seconds']:.1f} s",
                ratio(r["seconds"], p["seconds"]),
                f"{r['peak'] / MiB:.0f} MiB",
                ratio(r["peak"], p["peak"], 2),
                estimate,
            ]
        )
    return table(head, rows) + "\n\n" + sources(*names)


def rule_sets_at_length(name: str) -> str:
    """Each rule set's time against plain generation's and the floor of its work here."""
    head = ["rule set", "time", "vs plain", "floor", "peak", "vs plain", "estimate / growth"]
    rows = []
    for r, p in long_rows([name]):
        rules = "plain generation" if r["method"] == "plain" else r["method"].removeprefix("rules=")
        floor = ratio(p["seconds"] + r["floor"], p["seconds"]) if "floor" in r else ""
        estimate = f"{r['estimate'] / r['growth']:.2f}" if "estimate" in r else ""
        rows.append(
            [
                {"llama_attrib": "exact"}.get(rules, rules),
                f"{r['seconds']:.1f} s",
                ratio(r["seconds"], p["seconds"]),
                floor,
                f"{r['peak'] / MiB:.0f} MiB",
                ratio(r["peak"], p["peak"], 2),
                estimate,
            ]
        )
    return table(head, rows) + "\n\n" + sources(name)


def headline(cpu: list[str], gpu: str) -> str:
    """README's table: llama_attrib (exact rules, default or under a budget) beside plain generation."""
    head = ["case", "prompt + new", "plain generation", "llama_attrib", "peak memory, plain", "llama_attrib"]
    rows = []
    for r, p in long_rows(cpu):
        if r["method"] == "plain" or r["method"] == "naive" or r["method"].startswith("rules="):
            continue
        case = CASES.get(r["case"], r["case"])
        if r["method"].startswith("max_memory="):
            case = f'the same, `max_memory="{r["method"].split("=", 1)[1]}"`'
        rows.append(
            [
                case,
                f"{r['prompt']} + {r['new']}",
                f"{p['seconds']:.1f} s",
                f"{r['seconds']:.1f} s ({ratio(r['seconds'], p['seconds'])})",
                f"{p['peak'] / MiB:.0f} MiB",
                f"{r['peak'] / MiB:.0f} MiB ({ratio(r['peak'], p['peak'], 2)})",
            ]
        )
    plain: dict[tuple[int, int], dict[str, Any]] = {}
    for r in data(gpu).records:
        if r["mode"] == "plain":
            plain[r["prompt"], r["new"]] = r
        elif r["mode"] == "target" and r["prompt"] >= 8192:
            p = plain[r["prompt"], r["new"]]
            rows.append(
                [
                    "7B shape, bfloat16, H200 (earlier code)",
                    f"{r['prompt']} + {r['new']}",
                    f"{p['seconds']:.2f} s",
                    f"{r['seconds']:.1f} s ({ratio(r['seconds'], p['seconds'])})",
                    f"{p['peak'] / MiB:.0f} MiB",
                    f"{r['peak'] / MiB:.0f} MiB ({ratio(r['peak'], p['peak'], 2)})",
                ]
            )
    return table(head, rows) + "\n\n" + sources(*cpu, gpu)


# --- benchmarks/flow_cost.py ---------------------------------------------------------------


def flow_cost(name: str) -> str:
    head = [
        "prompt",
        "plain forward",
        "per-token (target mode)",
        "per-token (forward mode)",
        "flow",
        "flow / plain",
    ]
    rows = [
        [
            str(r["prompt"]),
            *(f"{r[k]:.2f} s" for k in ("plain", "target", "forward", "flow")),
            ratio(r["flow"], r["plain"], 0),
        ]
        for r in data(name).records
    ]
    return table(head, rows) + "\n\n" + sources(name)


# --- the faithfulness evaluation (python -m llama_attrib.evaluation --out) --------------------


def faithfulness(
    name: str, group: str, columns: list[str] | None = None, labels: dict[str, str] | None = None
) -> str:
    """One of the evaluation's tables (``group``: all, short or long prompts), the best figure of
    each column among the methods (random left out) in bold."""
    from llama_attrib.evaluation.harness import COLUMNS, RANDOM, Config, summarize

    d = data(name)
    config = Config(**d.body["config"])
    records = d.records
    if group != "all":
        records = [r for r in records if (r["category"] == "long") == (group == "long")]
    summary = summarize(records, config)
    keys = columns or [k for k, _ in COLUMNS]
    titles = dict(COLUMNS)
    pct = f"{round(config.fixed * 100)}%"
    head = ["method", *(titles[k].format(f=pct) for k in keys)]
    best = {}
    for key in keys:
        values = [row[key] for method, row in summary.items() if method != RANDOM]
        best[key] = min(values) if titles[key].endswith("↓") else max(values)
    rows = []
    for method, row in summary.items():
        cells = []
        for key in keys:
            cell = f"{row[key]:.2f}" if key == "seconds" else f"{row[key]:.3f}"
            bold = method != RANDOM and key != "seconds" and f"{row[key]:.3f}" == f"{best[key]:.3f}"
            cells.append(f"**{cell}**" if bold else cell)
        rows.append([(labels or {}).get(method, method), *cells])
    explained = sum(len(r["steps"]) for r in records)
    ranked = sum("span_rank" in r for r in records)
    with_span = sum("answer_matches" in r for r in records)
    minutes = sum(r.get("seconds_total", 0.0) for r in records) / 60
    count = (
        f"{len(records)} prompts, {explained} explained tokens, {minutes:.1f} min; span rank on the "
        f"{ranked} of {with_span} prompts with a source span whose first generated token is the answer."
    )
    return count + "\n\n" + table(head, rows) + "\n\n" + sources(name)


RULE_LABELS = {
    "decomposition": "exact (`decomposition`)",
    "decomposition-no-first": "exact, first token left out",
    "attnlrp": "`attnlrp`",
    "attnlrp-no-first": "`attnlrp`, first token left out",
    "attnlrp-path": "`attnlrp-path`",
    "attnlrp-path-no-first": "`attnlrp-path`, first token left out",
    "attnlrp-logprob-no-first": "`attnlrp` on the log-probability, first token left out",
    "attnlrp-path-logprob-no-first": "`attnlrp-path` on the log-probability, first token left out",
}
RULE_COLUMNS = ["del_aopc_all", "ins_aopc_all", "comp_all", "suff_all", "span_mrr", "span_hit1", "seconds"]


# --- benchmarks/against_context_cite.py ------------------------------------------------------


def _context_cite() -> Any:
    spec = importlib.util.spec_from_file_location(
        "against_context_cite", ROOT / "benchmarks/against_context_cite.py"
    )
    assert spec and spec.loader
    sys.path.insert(0, str(ROOT / "benchmarks"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CITE_LABELS = {
    "llama_attrib": "llama_attrib (`attribute`, per token)",
    "one_pass": "llama_attrib (`decompose_answer`, one pass)",
    "ContextCite": "ContextCite (64 ablations)",
    "one_pass_attnlrp": "`decompose_answer`, `attnlrp`",
    "one_pass_attnlrp-path": "`decompose_answer`, `attnlrp-path`",
}


def context_cite(*names: str) -> str:
    """The comparison's table over the documents of the first file, each document's methods
    merged from every file (a later file adds methods to the documents of the first)."""
    module = _context_cite()
    merged: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(names):
        for row in data(name).records:
            if i == 0 or row["doc"] in merged:
                merged.setdefault(row["doc"], {}).update(row)
    text = module.table([merged[k] for k in sorted(merged)], _tokenizer())
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if i < 2 or not line.startswith("|"):
            continue
        name = line.split("|")[1].strip()
        lines[i] = line.replace(f"| {name} |", f"| {CITE_LABELS.get(name, name)} |", 1)
    body = "\n".join(line for line in lines if line.startswith("|"))
    note = next(line for line in lines if line and not line.startswith("|"))
    return body + "\n\n" + note + ".\n\n" + sources(*names)


@functools.cache
def _tokenizer() -> Any:
    """SmolLM2's tokenizer, to find the sentence each logged response came from."""
    from llama_attrib.models import load

    return load()[1]


# --- scripts/measure_guards.py and scripts/measure_quantized.py ------------------------------


def guards(name: str) -> str:
    """The largest relative error each run-time guard saw, by model and dtype."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for r in data(name).records:
        found.setdefault((r["case"], r["dtype"]), {})[r["guard"]] = r["error"]
    order = {"float32": 0, "bfloat16": 1, "float16": 2}
    keys = sorted(found, key=lambda k: (k[0], order.get(k[1], 3)))
    head = ["model", "dtype", "forward (hidden state)", "target (logit)", "replay (a layer run again)"]
    rows = [
        [
            case,
            dtype,
            *(f"{found[case, dtype].get(g, float('nan')):.1e}" for g in ("forward", "target", "replay")),
        ]
        for case, dtype in keys
    ]
    return table(head, rows) + "\n\n" + sources(name)


def quantized(name: str) -> str:
    head = [
        "weights",
        "components + shares vs the logit",
        "rounding share / logit",
        "components vs float32's (/ largest)",
        "same top source as float32",
    ]
    rows = [
        [
            r["weights"],
            f"{r['sums']:.1e}",
            f"{r['rounding']:.1e}",
            f"{r['moved']:.1e}",
            f"{r['same_top']:.0%} of steps",
        ]
        for r in data(name).records
    ]
    return table(head, rows) + "\n\n" + sources(name)


# --- benchmarks/serve_load.py ------------------------------------------------------------------


def serve_load(name: str) -> str:
    """The server under N concurrent clients; with attribution, its cost per generated token
    against ``attribute()``'s in one process."""
    records = data(name).records
    own = next(r for r in records if r.get("in_process"))
    per_token = own["seconds"] / own["tokens"]
    head = [
        "clients",
        "attribution",
        "wall",
        "mean latency",
        "largest",
        "tokens / s",
        "s / token vs in-process",
    ]
    head += ["lost", "every answer equal to it served alone"]
    rows = []
    for r in records:
        if r.get("in_process"):
            continue
        rate = r["tokens"] / r["wall"]
        versus = f"{(1 / rate) / per_token:.2f}x" if r["attribution"] else ""
        rows.append(
            [
                str(r["clients"]),
                "on" if r["attribution"] else "off",
                f"{r['wall']:.1f} s",
                f"{r['latency_mean']:.1f} s",
                f"{r['latency_max']:.1f} s",
                f"{rate:.2f}",
                versus,
                str(r["lost"]),
                "yes" if r["equal_alone"] else "no",
            ]
        )
    rows.append(["in this process, `attribute()`", "on", "", "", "", f"{1 / per_token:.2f}", "1.00x", "", ""])
    return table(head, rows) + "\n\n" + sources(name)


# --- the registry ------------------------------------------------------------------------------

GPU_LAYERS = "results/gpu_h200_layer_by_layer.json"
GPU_PRECISION = "results/gpu_h200_precision.json"
LONG = [
    "results/long_documents.json",
    "results/long_documents_8000.json",
    "results/long_documents_budget.json",
]

TABLES: dict[str, Callable[[], str]] = {
    "speed-cpu": lambda: bench("results/speed_cpu.json"),
    "long-documents": lambda: long_documents(*LONG),
    "long-documents-readme": lambda: headline(LONG, GPU_LAYERS),
    "rule-sets-8000": lambda: rule_sets_at_length("results/long_documents_8000.json"),
    "gpu-7b": lambda: bench(GPU_LAYERS),
    "gpu-precision": lambda: bench(GPU_PRECISION),
    "guards-half": lambda: guards("results/guards_half.json"),
    "quantized": lambda: quantized("results/quantized.json"),
    "serve-load": lambda: serve_load("results/serve_load.json"),
    "flow-cost": lambda: flow_cost("results/flow_cost.json"),
    "faithfulness-all": lambda: faithfulness("faithfulness.json", "all"),
    "faithfulness-short": lambda: faithfulness("faithfulness.json", "short"),
    "faithfulness-long": lambda: faithfulness("faithfulness.json", "long"),
    "faithfulness-rules": lambda: faithfulness("faithfulness_rules.json", "all", RULE_COLUMNS, RULE_LABELS),
    "faithfulness-logprob": lambda: faithfulness(
        "faithfulness_logprob.json", "all", RULE_COLUMNS, RULE_LABELS
    ),
    "context-cite": lambda: context_cite("against_context_cite.jsonl"),
    "context-cite-rules": lambda: context_cite(
        "against_context_cite_rules.jsonl", "against_context_cite.jsonl"
    ),
}


def render(text: str, rendered: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise KeyError(f"<!-- table: {name} --> names no table of scripts/docs_tables.py")
        if name not in rendered:
            rendered[name] = TABLES[name]()
        indent = match.group(1)
        body = "\n".join(indent + line if line else line for line in rendered[name].splitlines())
        return f"{indent}<!-- table: {name} -->\n{body}\n{indent}<!-- /table -->"

    return BLOCK.sub(one, text)


FIGURE = re.compile(r"\b\d+\.\d+ ?(s|MiB|GiB|GB|x|%)(?!\w)|\b\d\.\d+e-\d+\b|\b\d+\.\d{2,}\b")


def loose_tables(path: Path) -> list[str]:
    """The Markdown tables of ``path`` outside every block that hold a measured figure (a time,
    a size, a ratio, a percentage or a decimal), each as its first line."""
    text = BLOCK.sub("", path.read_text())
    found, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            current.append(line)
            continue
        if any(FIGURE.search(row) for row in current[2:]):
            found.append(current[0].strip())
        current = []
    return found


def differences(paths: Iterable[Path] = DOCS) -> list[str]:
    """The tables whose text differs from their files' rendering, as ``path: name``."""
    rendered: dict[str, str] = {}
    found = []
    for path in paths:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            if render(match.group(0), rendered) != match.group(0):
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{shown}: {match.group(2)}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only say which tables differ; exit 1 if any")
    args = parser.parse_args()
    if args.check:
        found = differences()
        print("\n".join(f"differs from its data: {f}" for f in found) or "every table equals its data")
        raise SystemExit(1 if found else 0)
    rendered: dict[str, str] = {}
    for path in DOCS:
        text = path.read_text()
        new = render(text, rendered)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
