"""One model, one request at a time: the server's worker.

Requests wait their turn on a lock (the library serializes decompositions of one model
anyway); at most ``limits.max_queue`` may wait, beyond that :class:`Busy` (503). A request
that is cancelled (its client went away) stops its generation at the next token by an
exception raised from a stopping criterion; :func:`llama_attrib.attribute` restores the model
on the way out, as after any error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attribution import attribute, encode
from ..families import input_device
from ..result import Attribution


class Busy(Exception):
    """Too many requests wait for the model."""


class Cancelled(Exception):
    """The request's client went away: its generation stops."""


class TooLong(Exception):
    """The prompt has more tokens than the server takes."""


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 512
    max_queue: int = 4  # requests that may wait while one runs


@dataclass
class Outcome:
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    result: Attribution | None = None


@dataclass
class Request:
    """What to generate and how to explain it (``attribution`` None: plain generation)."""

    prompt: Any  # text, or chat messages
    chat: bool
    max_new_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)
    attribution: dict[str, Any] | None = None  # rules, target
    response: str | None = None  # explain this answer instead of generating one
    on_token: Callable[[int], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Streamer:
    """generate's streamer: skips the prompt, passes every new token id on."""

    def __init__(self, request: Request) -> None:
        self.request, self.prompt_seen = request, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.request.on_token is not None:
            for token in value.reshape(-1).tolist():
                self.request.on_token(int(token))

    def end(self) -> None:
        pass


class _StopWhenCancelled:
    """A stopping criterion that aborts generate (and the decomposition after it) by raising."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.request.cancelled.is_set():
            raise Cancelled("the client went away")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Ticket:
    """A place in an engine's queue: :meth:`release` gives it back, once (later calls do
    nothing); ``started``: the request's work has begun (it then releases it itself)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.started, self._held = engine, False, True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self.engine.give_back()


class Engine:
    def __init__(
        self, model: Any, tokenizer: Any, name: str, options: dict[str, Any], limits: Limits
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.options, self.limits = dict(options), limits
        self._turn = threading.Lock()  # the model's: one request at a time
        self._count = threading.Lock()
        self.pending = 0  # running and waiting
        self.served = 0

    def admit(self) -> Ticket:
        """A place in the queue, or :class:`Busy`."""
        with self._count:
            if self.pending > self.limits.max_queue:
                raise Busy(f"{self.pending} requests are running or waiting; try again later")
            self.pending += 1
        return Ticket(self)

    @contextmanager
    def admitted(self) -> Iterator[None]:
        ticket = self.admit()
        try:
            yield
        finally:
            ticket.release()

    def give_back(self) -> None:
        with self._count:
            self.pending -= 1

    def prompt_ids(self, request: Request) -> torch.Tensor:
        ids = encode(self.tokenizer, request.prompt, request.chat)
        if ids.shape[1] > self.limits.max_prompt_tokens:
            raise TooLong(
                f"the prompt has {ids.shape[1]} tokens; this server takes at most "
                f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)"
            )
        if request.response is not None:
            answer = len(self.tokenizer(request.response, add_special_tokens=False)["input_ids"])
            if answer > self.limits.max_new_tokens:
                raise TooLong(
                    f"the response has {answer} tokens; this server explains at most "
                    f"{self.limits.max_new_tokens} (--max-new-tokens)"
                )
        return ids

    def run(self, request: Request, ids: torch.Tensor | None = None) -> Outcome:
        """Generate (and explain) one request; waits for the model's turn. ``ids``: its
        :meth:`prompt_ids`, where the caller has them already."""
        ids = self.prompt_ids(request) if ids is None else ids
        with self._turn:
            if request.cancelled.is_set():
                raise Cancelled("the client went away")
            outcome = self._run(request, ids)
            self.served += 1
            return outcome

    def _run(self, request: Request, ids: torch.Tensor) -> Outcome:
        tokenizer = self.tokenizer
        kwargs: dict[str, Any] = {
            "streamer": _Streamer(request),
            "stopping_criteria": [_StopWhenCancelled(request)],
            **request.sampling,
        }
        if "seed" in kwargs:
            torch.manual_seed(int(kwargs.pop("seed")))
        if request.attribution is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            device = input_device(self.model)
            with torch.no_grad():
                out = self.model.generate(
                    ids.to(device),
                    attention_mask=torch.ones_like(ids).to(device),
                    max_new_tokens=request.max_new_tokens,
                    pad_token_id=pad,
                    **{"do_sample": False, **kwargs},
                )
            generated = [int(t) for t in out[0, ids.shape[1] :].tolist()]
            return self._outcome(ids, generated, request, None)
        options = {**self.options, **request.attribution}
        if request.response is not None:
            kwargs.pop("streamer")
        result = attribute(
            self.model,
            tokenizer,
            request.prompt,
            request.max_new_tokens,
            chat=request.chat,
            response=request.response,
            **options,
            **kwargs,
        )
        return self._outcome(ids, result.generated_ids, request, result)

    def flow(self, token_ids: list[int], position: int, target: int | None) -> dict[str, Any]:
        """:func:`llama_attrib.flow` of one logit, as JSON: ``scores [sources][layers][heads + 1]``
        (the heads, then the MLP) and their sums by layer and part."""
        from ..flow import flow
        from ..tokens import piece_texts

        ids = torch.tensor([token_ids])
        labels = piece_texts(self.tokenizer, token_ids)[0]
        with self.admitted(), self._turn:
            found = flow(
                self.model, ids, position, target, labels=labels, max_memory=self.options.get("max_memory")
            )
        return {
            "position": found.position,
            "target": found.target if isinstance(found.target, int) else None,
            "logit": found.logit,
            "layers": found.layers,
            "heads": found.heads,
            "labels": labels,
            "scores": found.scores.tolist(),
            "by_part": found.by_part().tolist(),
        }

    def _outcome(self, ids: torch.Tensor, generated: list[int], request: Request, result: Any) -> Outcome:
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        stopped = bool(generated) and generated[-1] in eos_ids
        cut = request.response is None and not stopped and len(generated) >= request.max_new_tokens
        finish = "length" if cut else "stop"
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return Outcome(int(ids.shape[1]), generated, text, finish, result)
