"""``llama-attrib "prompt"``: decompose a generation and print, for every generated token,
the contribution of every earlier token to its logit. ``llama-attrib serve``: the HTTP server
(:mod:`llama_attrib.server`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .attribution import attribute
from .models import add_arguments, from_arguments
from .result import Attribution


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-attrib", description=__doc__)
    p.add_argument("prompt", help="the prompt (a user message with --chat)")
    add_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--top", type=int, default=0, help="show only the N largest contributors per step")
    p.add_argument("--words", action="store_true", help="sum subword pieces into words (same as --by word)")
    p.add_argument(
        "--by",
        choices=["token", "word", "sentence", "paragraph"],
        default="token",
        help="sources: tokens, words, or the sentences/paragraphs of the prompt (of the user message "
        "with --chat), split without any download",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=0,
        metavar="N",
        help="first print the N sources the whole answer came from (score summed over its tokens, share)",
    )
    p.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="M",
        help="with --rank: measure the answer's log-probability without each of the M first sources "
        "(one batched forward) and rank by that drop",
    )
    p.add_argument("--share", action="store_true", help="scores as shares of the total |contribution|")
    p.add_argument("--drop-first", action="store_true", help="leave out the first token (attention sink)")
    p.add_argument("--html", metavar="FILE", help="also write the interactive HTML view to FILE")
    p.add_argument("--json", metavar="FILE", help="also save the result as JSON to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # llama-attrib serve ...: the HTTP server (llama_attrib.server)
        from .server import main as serve

        return serve(argv[1:])
    args = _parser().parse_args(argv)
    model, tokenizer, options = from_arguments(args)
    result = attribute(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        progress=not args.no_progress,
        **options,
    )
    if args.json:
        result.save(args.json)  # the full token-level result, whatever the view printed
    unit = "word" if args.words and args.by == "token" else args.by
    within = None
    if unit in ("sentence", "paragraph") and args.chat:
        within = result.message(args.prompt)  # the user message, not the chat template around it
    view = result.by(unit, within)
    if args.share or args.drop_first:
        view = view.normalize("share" if args.share else "logit", drop_first=args.drop_first)
    # verified citations are measured once, for the HTML view and the table
    cited = view.ranking(k=args.rank, verify=args.verify, model=model) if args.rank and args.verify else None
    if args.html:  # files first: printing may stop early (a closed pipe)
        view.to_html(args.html, citations=cited)
        print(f"HTML view written to {args.html}", file=sys.stderr)
    if args.rank:
        print(ranking_table(view, args.rank, args.verify, model, cited))
        print()
    print(view.table(top=args.top))
    return 0


def ranking_table(result: Attribution, k: int, verify: int = 0, model: Any = None, cited: Any = None) -> str:
    """The ``k`` sources of the whole answer, largest first: rank, share, score, text; with
    ``verify``, the measured drop of the answer's log-probability without each (re-ranked;
    ``cited``: those citations, already measured)."""
    lines = [
        f"sources of the answer {result.generation.strip()!r} (summed over its {result.n_generated} tokens):"
    ]
    ranked = cited if cited is not None else result.ranking(k=k, verify=verify, model=model)
    for i, (label, score, share, *drop) in enumerate(ranked, 1):
        text = " ".join(label.split())
        text = text[:100] + ("…" if len(text) > 100 else "")
        measured = ""
        if drop:  # verified: the drop without it, and whether that is evidence
            measured = f"  drop {drop[0]:+8.3f}" + ("" if drop[0] > 0 else " (not supported)")
        lines.append(f"  {i:3d}  {share:6.1%}  {score:+9.4f}{measured}  {text}")
    if verify and ranked:
        lines.append(f"  all {len(ranked)} removed together: drop {ranked.together:+8.3f}")
    outside = result.outside()
    if outside is not None:  # the template, the question, the attention sink: not a source to cite
        lines.append(f"  outside the sentences: {outside[2]:6.1%}  {outside[1]:+9.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
