"""Which sentence of a long document did the answer come from: llama_attrib against ContextCite.

    pip install context-cite==0.0.4            # the peer (pulls nltk, spacy, datasets)
    python benchmarks/against_context_cite.py [--limit N] [--out results.json] > log
    python benchmarks/against_context_cite.py --start 12 > log2    # a run continued
    python benchmarks/against_context_cite.py --table log log2    # the table of the documents done

ContextCite (Cohen-Wang et al. 2024) ablates the context 64 times (each sentence kept with
probability 1/2), runs one forward per ablation, and fits a sparse linear surrogate of the
response's log-probability. llama_attrib decomposes the response's logits exactly (target
mode) and sums each sentence's contributions over the response's tokens.

Both get the same documents, the same prompt (ContextCite's template in SmolLM2's chat
template), the same greedy response and the same sentence partition (llama_attrib's
splitter, handed to ContextCite as its partitioner: its own splitter downloads data). The
documents are built here: filler, one planted fact, and distractor sentences worded like
the fact; the fact's sentence is the known source. Measured per method, ContextCite's own
metric: the drop of the response's log-probability when the top 1, 3 and 5 sentences are
removed from the context (larger is better), whether the fact's sentence ranks first, and
the seconds per answer (generation included). Prints a Markdown table; ``--out`` keeps
every document's figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import llama_attrib
from llama_attrib._saving import provenance
from llama_attrib.models import load
from llama_attrib.tokens import piece_texts, text_spans, tokens_in_span

sys.path.insert(0, str(Path(__file__).parent))
import long_documents

TEMPLATE = "Context: {context}\n\nQuery: {query}"  # ContextCite's default prompt template
NEW_TOKENS = 20
# (fact, question, distractors): each distractor is worded like the fact, other details
FACTS = [
    (
        "The access code for the archive room is 4817.",
        "What is the access code for the archive room?",
        ["The access code for the storage room is 2390.", "The access code for the server room is 7714."],
    ),
    (
        "The ferry to Norland leaves at 7:45 every morning.",
        "When does the ferry to Norland leave?",
        [
            "The ferry to Westby leaves at 9:10 every morning.",
            "The bus to Norland leaves at 6:30 every evening.",
        ],
    ),
    (
        "The astronomer Amara Osei discovered the comet in 1987.",
        "Who discovered the comet?",
        [
            "The astronomer Lena Varga discovered the asteroid in 1992.",
            "The physicist Tomas Weir named the nebula in 1979.",
        ],
    ),
    (
        "The bridge over the Kell river is 412 metres long.",
        "How long is the bridge over the Kell river?",
        [
            "The tunnel under the Kell river is 980 metres long.",
            "The bridge over the Sorn river is 265 metres long.",
        ],
    ),
    (
        "The museum's oldest painting is by Ines Marlow.",
        "Who painted the museum's oldest painting?",
        ["The museum's largest sculpture is by Paulo Renn.", "The library's oldest map is by Ines Castell."],
    ),
    (
        "The winning team scored 31 points in the final.",
        "How many points did the winning team score in the final?",
        [
            "The losing team scored 17 points in the final.",
            "The winning team scored 24 points in the semi-final.",
        ],
    ),
    (
        "The new library will open on the 14th of March.",
        "When will the new library open?",
        ["The new pool will open on the 2nd of June.", "The old library will close on the 30th of January."],
    ),
    (
        "The company's headquarters moved to Tallinn.",
        "Where did the company's headquarters move?",
        ["The company's warehouse moved to Riga.", "The rival's headquarters moved to Vilnius."],
    ),
    (
        "The recipe calls for 350 grams of flour.",
        "How much flour does the recipe call for?",
        ["The recipe calls for 120 grams of sugar.", "The other recipe calls for 500 grams of flour."],
    ),
    (
        "The lighthouse keeper's name was Hector Bain.",
        "What was the lighthouse keeper's name?",
        ["The harbour master's name was Colin Rusk.", "The lighthouse builder's name was Angus Bell."],
    ),
]
FILLER = [  # long_documents.py's filler, and more
    *long_documents.FILLER,
    "A choir from the neighbouring village performed at the cathedral on Sunday.",
    "The ferry company repainted two of its older vessels over the summer.",
    "Hikers were advised to carry water because the spring on the ridge had dried up.",
    "The school canteen introduced a vegetarian option on three days of the week.",
    "An old mill on the edge of town was converted into a small hotel.",
    "The regional newspaper celebrated its hundredth anniversary with a special edition.",
    "Cyclists asked for a separate lane on the main road into the city centre.",
    "The orchard produced fewer apples than usual after a late frost in April.",
]
LENGTHS = [1000, 1200, 1500, 2000, 1000, 3000, 1200, 4000, 1500, 8000]


def document(i: int, tokens: int, tokenizer: Any) -> tuple[str, str, list[str]]:
    """``(context, question, planted)``: filler to about ``tokens`` tokens, the fact and its
    distractors (``planted``, the fact first) at seeded random places."""
    fact, question, distractors = FACTS[i % len(FACTS)]
    rng = random.Random(i)
    sentences: list[str] = []
    while len(tokenizer(" ".join(sentences)).input_ids) < tokens:
        sentences.extend(rng.sample(FILLER, len(FILLER)))
    while len(tokenizer(" ".join(sentences)).input_ids) > tokens:
        sentences.pop()
    for extra in [fact, *distractors]:
        sentences.insert(rng.randrange(len(sentences) + 1), extra)
    return " ".join(sentences), question, [fact, *distractors]


def answer_source(response: str, question: str, planted: list[str], sources: list[str]) -> list[int]:
    """The sentences (indices into ``sources``) the response took its answer from: the planted
    sentence (fact or distractor) whose own words, those no other planted sentence and not the
    question has, the response contains; else every copy of a filler sentence the response
    repeats word for word; else none (the response comes from no one sentence)."""

    def words(text: str) -> set[str]:
        return set(re.findall(r"\w+(?::\w+)?", text.replace("'s", "")))

    own = [words(s) - words(question) for s in planted]
    said = words(response)
    others = [set().union(*(v for k, v in enumerate(own) if k != j)) for j in range(len(own))]
    found = [j for j, w in enumerate(own) if said & (w - others[j])]
    if len(found) == 1:
        return [sources.index(planted[found[0]])]
    repeated = next((s for s in sources if s.rstrip(".") in response), None)
    return [i for i, s in enumerate(sources) if s == repeated]


class _Base:
    """What the partition needs of context-cite's base class, where that is not installed."""

    def __init__(self, context: str) -> None:
        self.context = context

    @property
    def sources(self) -> list[str]:
        return [self.get_source(i) for i in range(self.num_sources)]  # type: ignore[attr-defined]


class Partition:
    """llama_attrib's sentence spans as a ContextCite partitioner (built lazily: the class
    derives from context-cite's base class, an optional dependency)."""

    @staticmethod
    def make(context: str) -> Any:
        try:
            from context_cite.context_partitioner import BaseContextPartitioner
        except ImportError:  # the peer is not installed: the same sentences for llama_attrib's rows
            BaseContextPartitioner = _Base

        class _Partition(BaseContextPartitioner):  # type: ignore[misc,valid-type]
            def __init__(self, context: str) -> None:
                super().__init__(context)
                self.spans = text_spans(context, "sentence")

            @property
            def num_sources(self) -> int:
                return len(self.spans)

            def split_context(self) -> None:
                pass

            def get_source(self, index: int) -> str:
                a, b = self.spans[index]
                return self.context[a:b]

            def get_context(self, mask: Any = None) -> str:
                keep = np.ones(len(self.spans), bool) if mask is None else np.asarray(mask, bool)
                return " ".join(self.get_source(i) for i in range(len(self.spans)) if keep[i])

        return _Partition(context)


def prompt_ids(tokenizer: Any, context: str, question: str) -> list[int]:
    """ContextCite's way: the template in the chat template, encoded without extra tokens."""
    messages = [{"role": "user", "content": TEMPLATE.format(context=context, query=question)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


@torch.no_grad()
def response_logprob(model: Any, tokenizer: Any, context: str, question: str, response: list[int]) -> float:
    """Log-probability of the response's tokens after the prompt with ``context`` (teacher forced)."""
    ids = prompt_ids(tokenizer, context, question)
    full = torch.tensor([ids + response])
    logits = model(full, use_cache=False, logits_to_keep=len(response) + 1).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)[torch.arange(len(response)), torch.tensor(response)]
    return float(logp.sum())


def drops(
    model: Any, tokenizer: Any, part: Any, question: str, response: list[int], order: list[int]
) -> dict[str, float]:
    base = response_logprob(model, tokenizer, part.get_context(), question, response)
    out = {}
    for k in (1, 3, 5):
        mask = np.ones(part.num_sources, bool)
        mask[order[:k]] = False
        out[f"top{k}"] = base - response_logprob(model, tokenizer, part.get_context(mask), question, response)
    return out


def ours(model: Any, tokenizer: Any, context: str, question: str) -> tuple[list[int], np.ndarray, float]:
    """The response's ids, one score per sentence (summed over the response's tokens), seconds."""
    messages = [{"role": "user", "content": TEMPLATE.format(context=context, query=question)}]
    start = time.perf_counter()
    result = llama_attrib.attribute(model, tokenizer, messages, max_new_tokens=NEW_TOKENS, chat=True)
    view = result.sentences(within=result.find(context))
    scores = np.nansum(view.scores, 0)[: len(text_spans(context, "sentence"))]
    seconds = time.perf_counter() - start
    return result.generated_ids, scores, seconds


def one_pass(
    model: Any, tokenizer: Any, context: str, question: str, rules: str = "exact"
) -> tuple[list[int], np.ndarray, float]:
    """The same scores as :func:`ours` (each sentence's contributions summed over the response's
    tokens) from one backward pass: ``decompose_answer`` pulls the summed logits back at once
    (under the rule set ``rules``)."""
    ids = torch.tensor([prompt_ids(tokenizer, context, question)])
    p = ids.shape[1]
    start = time.perf_counter()
    with torch.no_grad():
        sequence = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    answer = llama_attrib.decompose_answer(model, sequence, p, rules=rules)
    texts = piece_texts(tokenizer, sequence[0].tolist())[0]
    offset = "".join(texts).find(context)
    components = answer.components.float().numpy()
    scores = np.array(
        [components[tokens_in_span(texts[:-1], offset + a, offset + b)].sum() for a, b in text_spans(context)]
    )
    seconds = time.perf_counter() - start
    return sequence[0, p:].tolist(), scores, seconds


def theirs(model: Any, tokenizer: Any, context: str, question: str) -> tuple[list[int], np.ndarray, float]:
    from context_cite import ContextCiter

    start = time.perf_counter()
    cc = ContextCiter(
        model,
        tokenizer,
        context,
        question,
        partitioner=Partition.make(context),
        generate_kwargs={"max_new_tokens": NEW_TOKENS, "do_sample": False},
    )
    scores = np.asarray(cc.get_attributions(verbose=False))
    seconds = time.perf_counter() - start
    return list(cc._response_ids), scores, seconds


METHODS = {"llama_attrib": ours, "one_pass": one_pass, "ContextCite": theirs}
for _rules in llama_attrib.rules.RULE_SETS:  # one_pass under every other rule set: one_pass_attnlrp...
    if _rules != "exact":
        METHODS[f"one_pass_{_rules}"] = functools.partial(one_pass, rules=_rules)


def table(rows: list[dict[str, Any]], tokenizer: Any) -> str:
    """The Markdown table of the documents done (``rows``: what ``main`` prints, one per
    document). Each document is built again to find the sentence each response came from."""
    for row in rows:
        context, question, planted = document(row["doc"], LENGTHS[row["doc"] % len(LENGTHS)], tokenizer)
        sources = [context[a:b] for a, b in text_spans(context, "sentence")]
        for name in [m for m in METHODS if m in row]:
            x = row[name]
            x["answer_source"] = answer_source(x["response"], question, planted, sources)
            x["answer_first"] = x["ranked"][0] in x["answer_source"]
    out = [
        "| method | fact ranked first | answer's source ranked first | top-1 drop | top-3 drop "
        "| top-5 drop | seconds per answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in [m for m in METHODS if any(m in row for row in rows)]:
        r = [row[name] for row in rows if name in row]
        first, answer = sum(x["first"] for x in r), sum(x["answer_first"] for x in r)
        known = sum(bool(x["answer_source"]) for x in r)
        out.append(
            f"| {name} | {first}/{len(r)} | {answer}/{known} | {np.mean([x['top1'] for x in r]):.2f} | "
            f"{np.mean([x['top3'] for x in r]):.2f} | {np.mean([x['top5'] for x in r]):.2f} | "
            f"{np.mean([x['seconds'] for x in r]):.1f} |"
        )
    same = sum(len({row[m]["response"] for m in METHODS if m in row}) == 1 for row in rows)
    out.append(
        f"\n{len(rows)} documents, {min(r['tokens'] for r in rows)} to {max(r['tokens'] for r in rows)} "
        f"tokens; same response from both: {same}/{len(rows)}; the answer's source: the planted "
        "sentence whose detail the answer gives, else a sentence it repeats (documents with neither "
        "are left out of that column)"
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--limit", type=int, help="only the first N documents")
    parser.add_argument("--methods", default="llama_attrib,one_pass,ContextCite", help=", ".join(METHODS))
    parser.add_argument("--start", type=int, default=0, help="begin at document N (a run continued)")
    parser.add_argument("--out", help="write every document's figures to this JSON file")
    parser.add_argument("--table", nargs="+", help="only print the table of logs of this script (JSON lines)")
    args = parser.parse_args()
    if args.table:
        lines = [line for log in args.table for line in Path(log).read_text().splitlines()]
        tokenizer = load()[1]
        merged: dict[int, dict[str, Any]] = {}  # a document's methods may come from several logs
        for line in lines:
            if line.startswith('{"doc"'):
                row = json.loads(line)
                merged.setdefault(row["doc"], {}).update(row)
        print(table([merged[k] for k in sorted(merged)], tokenizer))
        return
    model, tokenizer = load()
    print(json.dumps({"meta": provenance()}), flush=True)  # a log's first line: where its rows come from
    rows = []
    for i in range(args.start, args.docs if args.limit is None else min(args.limit, args.docs)):
        context, question, planted = document(i, LENGTHS[i % len(LENGTHS)], tokenizer)
        part = Partition.make(context)
        indices = [part.sources.index(s) for s in planted]
        row: dict[str, Any] = {
            "doc": i,
            "tokens": len(prompt_ids(tokenizer, context, question)),
            "source": indices[0],
            "planted": indices,
        }
        for name in args.methods.split(","):
            method = METHODS[name]
            response, scores, seconds = method(model, tokenizer, context, question)
            order = [int(j) for j in np.argsort(-scores, kind="stable")]
            text = tokenizer.decode(response)
            row[name] = {
                "seconds": seconds,
                "first": order[0] == indices[0],
                "response": text,
                "ranked": order[:5],
                **drops(model, tokenizer, part, question, response, order),
            }
        row["same_response"] = len({row[name]["response"] for name in args.methods.split(",")}) == 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n" + table(rows, tokenizer))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
