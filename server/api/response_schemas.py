"""Response bodies in OpenAI's shapes. They keep every field OpenAI's published schema
requires, null included; the few OpenAI omits while unset are dropped while None."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _omitted_when_none(*names: str):
    """json_schema_extra for fields dropped from the output while None (exclude_if): the
    schema must not list them as required, unlike the fields we send as null."""
    def fix(schema: dict) -> None:
        required = [r for r in schema.get("required", []) if r not in names]
        if required:
            schema["required"] = required
        else:
            schema.pop("required", None)
    return fix


def _omit_none(value: Any) -> bool:
    return value is None


class _ResponseBody(BaseModel):
    # Fields with defaults are still always sent, so the document marks them required.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class PromptTokensDetails(_ResponseBody):
    cached_tokens: int  # of the prompt tokens: those whose KV the prefix cache already held


class Usage(_ResponseBody):
    """Tokens of a request: each prompt counted once, whatever `n`; every choice's output."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails  # optional in OpenAI's schema; sent always, as OpenAI does


class CompletionLogprobs(_ResponseBody):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_ResponseBody):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None  # null only in a streamed chunk of an unfinished choice


class CompletionResponse(_ResponseBody):
    """A completion, or one streamed chunk of one (the same shape)."""

    model_config = ConfigDict(json_schema_extra=_omitted_when_none("usage"))

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_omit_none)  # not nullable in OpenAI's schema


class TopLogprob(_ResponseBody):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_ResponseBody):
    content: list[ChatTokenLogprob] | None = Field(default_factory=list)
    refusal: list[ChatTokenLogprob] | None = None  # we never refuse; OpenAI requires the key


class AssistantMessage(_ResponseBody):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(_ResponseBody):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_ResponseBody):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(_ResponseBody):
    """A chunk's delta: `role` on a choice's first chunk only, `content` when there is text."""

    model_config = ConfigDict(json_schema_extra=_omitted_when_none("role", "content"))

    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)


class ChatChunkChoice(_ResponseBody):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_ResponseBody):
    """One streamed chunk; `usage` is sent (null until the last chunk) only when asked for."""

    model_config = ConfigDict(json_schema_extra=_omitted_when_none("usage"))

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_omit_none)


class ModelCard(_ResponseBody):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "loramux"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    family: str | None = None  # the base model's family (server/model/families.py), on the base's card


class ModelList(_ResponseBody):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_ResponseBody):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_ResponseBody):
    error: ErrorBody
