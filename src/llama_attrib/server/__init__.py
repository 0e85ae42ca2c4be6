"""``llama-attrib serve``: an OpenAI-compatible HTTP server whose answers carry their sources,
and the explorer page (extra: ``server``).

    llama-attrib serve [--model PATH] [--port 8000] [--rules attnlrp] ...

One model per process, requests served one at a time (:mod:`.engine`); the API
(:mod:`.app`): ``POST /v1/chat/completions`` and ``/v1/completions`` (``stream`` true or false),
``POST /v1/attribute`` (explain a response generated elsewhere), ``POST /v1/flow``,
``GET /health``, ``GET /v1/models`` and the explorer at ``/``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def _parser() -> argparse.ArgumentParser:
    from ..models import add_arguments

    p = argparse.ArgumentParser(prog="llama-attrib serve", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model's name in the API (default: the model's path or name)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-new-tokens", type=int, default=512, help="the most a request may ask for")
    p.add_argument(
        "--max-queue", type=int, default=4, help="requests that may wait while one runs (then 503)"
    )
    return p


def build(args: Any) -> Any:
    """The app for parsed :func:`_parser` arguments (loads the model)."""
    from ..models import from_arguments
    from .app import create_app
    from .engine import Engine, Limits

    model, tokenizer, options = from_arguments(args)
    path = str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    name = args.name or path.rstrip("/").rsplit("/", 1)[-1]
    limits = Limits(args.max_prompt_tokens, args.max_new_tokens, args.max_queue)
    return create_app(Engine(model, tokenizer, name, options, limits))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise SystemExit(
            f"llama-attrib serve needs the server extra ({e.name} is missing): "
            "pip install 'llama_attrib[server]' (in a clone: pip install -e '.[server]')"
        ) from None
    args = _parser().parse_args(argv)
    app = build(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
