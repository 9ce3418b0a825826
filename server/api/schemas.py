"""Request bodies in OpenAI's shapes (plus vLLM-style sampling extras); responses are in
response_schemas.py.

Requests are validated strictly at the edge: no type coercion ("5" is not 5; an int is a
valid float, as JSON has one number type), no unknown fields, no lone surrogates. Every
refusal is a pydantic error, which the app turns into a 400 OpenAI error naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from server.engine.request import MAX_EXPERTS, MAX_LOGPROBS, MAX_STOP, MIN_REPETITION_PENALTY

# --- edge checks shared by every request body ---------------------------------------------

INT64 = 2**63  # seeds are OpenAI's int64; seed + choice index (n <= 16) still fits the engine's seed range


def _lone_surrogate_at(value: Any, path: tuple) -> tuple | None:
    """Location of the first string (value or key) that is not valid Unicode (a lone UTF-16
    surrogate, which JSON's \\ud800 escape can smuggle in and no encoder can write back)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if _lone_surrogate_at(key, path) is not None:
                return path  # never echo the bad key itself in the error's location
            found = _lone_surrogate_at(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate_at(item, (*path, i))
            if found is not None:
                return found
    return None


def _refuse(errors: list[tuple[str, str, tuple]]) -> ValidationError:
    """(error type, message, location) triples -> one ValidationError (input never echoed)."""
    return ValidationError.from_exception_data("request", [
        InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=None)
        for kind, message, loc in errors])


class RequestBody(BaseModel):
    """Base of a request body: strict types, unknown fields refused as "not supported"."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="wrap")
    @classmethod
    def _edge(cls, data: Any, handler):
        bad = _lone_surrogate_at(data, ())
        if bad is not None:
            raise _refuse([("invalid_unicode", "contains a lone surrogate (not valid Unicode text)", bad)])
        try:
            body = handler(data)
        except ValidationError as exc:
            # An unknown field is most often an OpenAI feature this server lacks (tools,
            # response_format...): say so, rather than pydantic's generic "extra input".
            errors = exc.errors()
            unknown = [e["loc"] for e in errors if e["type"] == "extra_forbidden"]
            if unknown:  # located at the field, not inside pydantic's union-branch tags
                raise _refuse([("unsupported_field", f"`{loc[-1]}` is not supported by this server",
                                _field_path(loc)) for loc in unknown]) from None
            if all(_field_path(e["loc"]) == e["loc"] for e in errors):
                raise
            # Report `prompt`, not `prompt.list[constrained-int].0`: the client named no union
            # branch, so one error per field lists what each accepted form objected to.
            by_field: dict[tuple, list[str]] = {}
            for e in errors:
                msgs = by_field.setdefault(_field_path(e["loc"]), [])
                if e["msg"] not in msgs:
                    msgs.append(e["msg"])
            raise _refuse([("invalid_value", msgs[0] if len(msgs) == 1 else
                            "matches none of the accepted forms: " + " | ".join(msgs), loc)
                           for loc, msgs in by_field.items()]) from None
        conflicts = body.conflicts()
        if conflicts:
            raise _refuse([("invalid_value", message, (name,)) for name, message in conflicts])
        return body

    def conflicts(self) -> list[tuple[str, str]]:
        """(field, why) for fields whose value is valid alone but not with the others': the
        client asked for something it would not get, so a 400 names the field."""
        return []


def _field_path(loc: tuple) -> tuple:
    """A pydantic error location up to its first union-branch tag (e.g. `list[str]`,
    `constrained-str`, `TextContentPart`): our field names are all lower snake_case."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and (part[:1].isupper() or any(c in part for c in "[-") or part in _TAGS):
            return loc[:i]
    return loc


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _only(shown: str, *allowed: Any):
    """An OpenAI field this server accepts only at its no-op value(s): anything else is a
    400 naming the field, since silently ignoring it would return what the client did not ask for."""
    def check(value: Any) -> Any:
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise PydanticCustomError("unsupported_value", f"this value is not supported by this server "
                                                          f"(only {shown})")
        return value
    return BeforeValidator(check)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool = False  # we never pad chunks, so either value is honoured


class TextFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


class AdapterWeight(BaseModel):
    """One expert of a mixture (`adapters`): its delta counts `weight` times (any finite sign)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    id: NonEmptyStr
    weight: float = Field(1.0, allow_inf_nan=False)


class RouteRequest(BaseModel):
    """Arrow routing per token among `experts` (omitted: every adapter the caller may use),
    keeping the `top_k` best and mixing them by softmax(logits / `temperature`), as PEFT's ArrowConfig."""

    model_config = ConfigDict(strict=True, extra="forbid")

    experts: Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_EXPERTS)] | None = None
    top_k: int = Field(3, ge=1)
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    use_gks: Annotated[bool, _only("use_gks false: GenKnowSub is not implemented", False)] = False


class _SamplingFields(RequestBody):
    model: str
    adapter_id: str | None = None  # names the adapter when `model` is the base
    # Expert libraries (`model` = the base; at most one of adapter_id, adapters, route): see Service.resolve_choice.
    adapters: Annotated[list[AdapterWeight], Field(min_length=1, max_length=MAX_EXPERTS)] | None = None
    route: RouteRequest | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: Probability | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10.0, allow_inf_nan=False)
    logit_bias: Annotated[dict[str, float] | None, _only("an empty logit_bias", {})] = None

    # Accepted OpenAI fields that cannot change the output: bookkeeping for the client's
    # own records or OpenAI's billing/caching, which this server neither keeps nor needs.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def conflicts(self) -> list[tuple[str, str]]:
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM answer
            return [("stream_options", "only allowed when stream is true")]
        return []


class CompletionRequest(_SamplingFields):
    prompt: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Annotated[str | None, _only("an empty suffix", "")] = None
    best_of: Annotated[int | None, _only("best_of 1", 1)] = None


class TextContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, refusal, annotations...) reach the chat template:
    # clients resend the assistant messages they got back, which carry such keys.
    model_config = ConfigDict(strict=True, extra="allow")

    role: NonEmptyStr
    # Validated as text parts, handed on as plain dicts (what the chat template renders).
    content: str | Annotated[list[TextContentPart], AfterValidator(
        lambda parts: [p.model_dump() for p in parts])] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    response_format: Annotated[TextFormat | None, _only('response_format {"type": "text"}', {"type": "text"})] = None
    tool_choice: Annotated[Literal["none"] | None, _only('tool_choice "none"', "none")] = None

    def conflicts(self) -> list[tuple[str, str]]:
        found = super().conflicts()
        if self.top_logprobs is not None and not self.logprobs:  # OpenAI: top_logprobs needs logprobs true
            found.append(("top_logprobs", "only allowed when logprobs is true"))
        if self.max_tokens is not None and self.max_completion_tokens is not None:  # as OpenAI answers
            found.append(("max_tokens", "not allowed together with max_completion_tokens (max_tokens is "
                                        "deprecated: give max_completion_tokens alone)"))
        return found
