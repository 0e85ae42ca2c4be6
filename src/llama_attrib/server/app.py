"""The HTTP API: OpenAI's chat and completion endpoints with an ``attribution`` object in each
choice, ``/v1/attribute`` for a response generated elsewhere, ``/v1/flow`` for one token, and
the explorer page at ``/``. Errors are OpenAI's shape: ``{"error": {"message", "type", ...}}``."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from ..errors import LlamaAttribError
from ..explorer import page
from . import engine as worker
from .payload import attribution_json
from .schema import AttributeRequest, ChatRequest, CompletionRequest, FlowRequest


def error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: worker.Engine) -> FastAPI:
    app = FastAPI(title="llama_attrib", docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON")
        if first.get("type") == "extra_forbidden":
            return error(400, f"unknown field {where!r}: this server does not take it", param=where)
        return error(400, f"{where}: {first.get('msg', 'invalid')}", param=where or None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "pending": engine.pending, "served": engine.served}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": engine.name, "object": "model", "created": 0, "owned_by": "llama_attrib"}
        return {"object": "list", "data": [card]}

    @app.get("/", response_class=HTMLResponse)
    async def explorer() -> str:
        return page()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        limit = body.max_completion_tokens or body.max_tokens
        return await serve(engine, body, messages, True, limit, "chat.completion")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Any:
        return await serve(engine, body, body.prompt, False, body.max_tokens, "text_completion")

    @app.post("/v1/attribute", response_model=None)
    async def attribute_response(body: AttributeRequest) -> Any:
        if (body.messages is None) == (body.prompt is None):
            return error(400, "give either messages or prompt (the text the response answers)")
        prompt = (
            [{"role": m.role, "content": m.text()} for m in body.messages] if body.messages else body.prompt
        )
        options = body.attribution
        job = worker.Request(
            prompt, body.messages is not None, engine.limits.max_new_tokens, response=body.response,
            attribution=_explained(options),
        )  # fmt: skip
        outcome = await _run(engine, job)
        if isinstance(outcome, JSONResponse):
            return outcome
        return {
            "object": "attribution",
            "model": engine.name,
            "response": body.response,
            "attribution": _payload(outcome, options),
        }

    @app.post("/v1/flow", response_model=None)
    async def flow_of(body: FlowRequest) -> Any:
        if len(body.token_ids) > engine.limits.max_prompt_tokens:
            return error(413, f"at most {engine.limits.max_prompt_tokens} tokens (--max-prompt-tokens)")
        try:
            return await run_in_threadpool(engine.flow, body.token_ids, body.position, body.target)
        except REFUSED as e:
            return refusal(e)

    return app


def _explained(options: Any) -> dict[str, Any] | None:
    if options is None:
        return None
    out = {"target": options.target}
    return out | ({"rules": options.rules} if options.rules else {})


def _payload(outcome: worker.Outcome, options: Any) -> dict[str, Any] | None:
    if outcome.result is None or options is None:
        return None
    return attribution_json(outcome.result, options.top, options.by, options.document, options.rank)


REFUSED = (worker.Busy, worker.TooLong, LlamaAttribError, ValueError)


def refusal(e: Exception) -> JSONResponse:
    """A request the server will not serve as asked: a full queue (503), a prompt too long
    (413), an option the model or the library refuses (400)."""
    if isinstance(e, worker.Busy):
        return error(503, str(e), "server_busy")
    return error(413 if isinstance(e, worker.TooLong) else 400, str(e))


async def _run(engine: worker.Engine, job: worker.Request) -> worker.Outcome | JSONResponse:
    try:
        with engine.admitted():
            return await run_in_threadpool(engine.run, job)
    except REFUSED as e:
        return refusal(e)


async def serve(
    engine: worker.Engine, body: Any, prompt: Any, chat: bool, limit: int | None, kind: str
) -> Any:
    if body.model != engine.name:
        return error(404, f"the model {body.model!r} does not exist here: this server serves {engine.name!r}")
    new = limit or min(256, engine.limits.max_new_tokens)
    if new > engine.limits.max_new_tokens:
        return error(400, f"max_tokens is {new}; this server takes at most {engine.limits.max_new_tokens}")
    if len(prompt if isinstance(prompt, str) else json.dumps(prompt)) > 64 * engine.limits.max_prompt_tokens:
        return error(413, f"the prompt is far longer than {engine.limits.max_prompt_tokens} tokens")
    options = body.explained()
    job = worker.Request(prompt, chat, new, body.sampling(), _explained(options))
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if not body.stream:
        outcome = await _run(engine, job)
        if isinstance(outcome, JSONResponse):
            return outcome
        choice: dict[str, Any] = {"index": 0, "finish_reason": outcome.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": outcome.text}
        else:
            choice["text"] = outcome.text
        choice["attribution"] = _payload(outcome, options)
        return {
            "id": ident,
            "object": kind,
            "created": int(time.time()),
            "model": engine.name,
            "choices": [choice],
            "usage": _usage(outcome),
        }
    try:
        ids = engine.prompt_ids(job)  # the prompt's length, before the stream's 200
        ticket = engine.admit()
    except REFUSED as e:
        return refusal(e)
    chunks = _stream(engine, job, ids, ticket, ident, kind, chat, options, body.stream_options or {})
    # a client gone before the stream began: its place is given back all the same
    unused = BackgroundTask(lambda: None if ticket.started else ticket.release())
    return StreamingResponse(chunks, media_type="text/event-stream", background=unused)


def _usage(outcome: worker.Outcome) -> dict[str, int]:
    new = len(outcome.token_ids)
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": new,
        "total_tokens": outcome.prompt_tokens + new,
    }


async def _stream(
    engine: worker.Engine,
    job: worker.Request,
    ids: Any,
    ticket: worker.Ticket,
    ident: str,
    kind: str,
    chat: bool,
    options: Any,
    stream_options: dict[str, Any],
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of text as it is generated, then one with the
    finish reason and the attribution (computed once the answer is complete), then ``[DONE]``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_token(token: int) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("token", token))

    job.on_token = on_token

    def work() -> None:
        ticket.started = True
        try:
            outcome = engine.run(job, ids)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", outcome))
        except BaseException as e:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
        finally:
            ticket.release()

    created = int(time.time())

    def chunk(delta: dict[str, Any] | None, text: str = "", **extra: Any) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": None, "logprobs": None, **extra}
        if chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = text
        body = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created}
        return f"data: {json.dumps({**body, 'model': engine.name, 'choices': [choice]})}\n\n"

    thread = loop.run_in_executor(None, work)
    tokens: list[int] = []
    sent = ""
    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            what, value = await queue.get()
            if what == "token":
                tokens.append(value)
                text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half a character: wait for the rest
                    continue
                piece, sent = text[len(sent) :], text
                if piece:
                    yield chunk({"content": piece}, piece)
            elif what == "error":
                message = str(value) if isinstance(value, LlamaAttribError | ValueError) else repr(value)
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                break
            else:
                outcome: worker.Outcome = value
                rest = outcome.text[len(sent) :] if outcome.text.startswith(sent) else ""
                attribution = _payload(outcome, options)
                yield chunk(
                    {"content": rest} if rest else {},
                    rest,
                    finish_reason=outcome.finish_reason,
                    attribution=attribution,
                )
                if stream_options.get("include_usage"):
                    body = {"id": ident, "object": f"{kind}.chunk", "created": created, "model": engine.name}
                    yield f"data: {json.dumps({**body, 'choices': [], 'usage': _usage(outcome)})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client gone mid-stream stops the generation at its next token
        del thread  # it ends by itself: at the next token, or when its pass is done
