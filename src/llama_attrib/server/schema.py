"""The server's requests: OpenAI's fields that it serves, plus ``attribution`` (its options, or
``false`` for plain generation). An unknown field is refused (400), so that a misspelt option
is never silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..rules import RULE_SETS

Role = Literal["system", "developer", "user", "assistant"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Role
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class AttributionOptions(_Strict):
    """What to explain and how to report it."""

    rules: str | None = None
    target: Literal["logit", "logprob"] = "logit"
    by: Literal["token", "word", "sentence", "paragraph"] = "token"
    top: int = Field(default=5, ge=1, le=100)
    rank: int = Field(default=5, ge=1, le=100)
    document: str | None = None  # a text inside the prompt whose sentences are ranked

    @field_validator("rules")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None and value not in RULE_SETS:
            raise ValueError(f"rules must be one of {', '.join(sorted(RULE_SETS))}")
        return value


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Literal[1] = 1
    stop: None = None  # stop sequences are not served: generation stops at the model's end token
    user: str | None = None
    attribution: AttributionOptions | bool = True

    def sampling(self) -> dict[str, Any]:
        """generate's options: greedy unless a temperature above 0 is given."""
        out: dict[str, Any] = {}
        if self.temperature:
            out |= {"do_sample": True, "temperature": self.temperature}
            if self.top_p is not None:
                out["top_p"] = self.top_p
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def explained(self) -> AttributionOptions | None:
        if self.attribution is False:
            return None
        return AttributionOptions() if self.attribution is True else self.attribution


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Generation):
    prompt: str = Field(min_length=1)


class AttributeRequest(_Strict):
    """Explain a given response (generated anywhere) to given messages or a prompt."""

    model: str | None = None
    messages: list[Message] | None = None
    prompt: str | None = None
    response: str = Field(min_length=1)
    attribution: AttributionOptions = AttributionOptions()


class FlowRequest(_Strict):
    """One logit split over source x layer x head/MLP (:func:`llama_attrib.flow`)."""

    token_ids: list[int] = Field(min_length=1)
    position: int = -1
    target: int | None = None  # a token id; default the argmax at ``position``
