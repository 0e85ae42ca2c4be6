"""``llama-attrib "prompt"``: decompose a generation and print, for every generated token,
the contribution of every earlier token to its logit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .attribution import attribute
from .models import load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-attrib", description=__doc__)
    p.add_argument("prompt", help="the prompt (a user message with --chat)")
    p.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--top", type=int, default=0, help="show only the N largest contributors per step")
    p.add_argument("--words", action="store_true", help="sum subword pieces into words")
    p.add_argument("--share", action="store_true", help="scores as shares of the total |contribution|")
    p.add_argument("--drop-first", action="store_true", help="leave out the first token (attention sink)")
    p.add_argument("--html", metavar="FILE", help="also write the interactive HTML view to FILE")
    p.add_argument("--json", metavar="FILE", help="also save the result as JSON to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    model, tokenizer = load(args.model)
    result = attribute(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        progress=not args.no_progress,
    )
    if args.json:
        result.save(args.json)  # the full token-level result, whatever the view printed
    view = result.words() if args.words else result
    if args.share or args.drop_first:
        view = view.normalize("share" if args.share else "logit", drop_first=args.drop_first)
    if args.html:  # files first: printing may stop early (a closed pipe)
        view.to_html(args.html)
        print(f"HTML view written to {args.html}", file=sys.stderr)
    print(view.table(top=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
