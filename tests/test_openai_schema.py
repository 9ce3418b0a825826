"""The HTTP contract against a real server: responses carry every field OpenAI's published
OpenAPI document requires, with the types it allows; requests are validated strictly (no
coercion, no silently ignored OpenAI features, no lone surrogates); and our own
/openapi.json documents what the server answers.

The required fields below were read from OpenAI's document (github.com/openai/openai-openapi,
openapi.yaml, components.schemas; component names in each key), not from our own output.
"""

from __future__ import annotations

import json

import httpx
import pytest

from server_process import ServerProcess

MODEL = "tiny"

NULL = type(None)
STR, INT, NUM, LIST, OBJ = (str,), (int,), (int, float), (list,), (dict,)

# object name -> {required field: allowed JSON types, or a set of allowed values}
REQUIRED: dict[str, dict[str, tuple | set]] = {
    "CreateCompletionResponse": {"id": STR, "object": {"text_completion"}, "created": INT, "model": STR,
                                 "choices": LIST},
    # The document types finish_reason as a non-null string, yet says the streamed chunks share
    # this shape: an unfinished choice's chunk carries null there, as OpenAI's API itself sends.
    "CreateCompletionResponse.choices[]": {"finish_reason": {"stop", "length", "content_filter", None},
                                           "index": INT, "logprobs": (dict, NULL), "text": STR},
    "CreateChatCompletionResponse": {"choices": LIST, "created": INT, "id": STR, "model": STR,
                                     "object": {"chat.completion"}},
    "CreateChatCompletionResponse.choices[]": {
        "finish_reason": {"stop", "length", "tool_calls", "content_filter", "function_call"},
        "index": INT, "message": OBJ, "logprobs": (dict, NULL)},
    "ChatCompletionResponseMessage": {"role": {"assistant"}, "content": (str, NULL), "refusal": (str, NULL)},
    "choices[].logprobs (chat)": {"content": (list, NULL), "refusal": (list, NULL)},
    "ChatCompletionTokenLogprob": {"token": STR, "logprob": NUM, "bytes": (list, NULL), "top_logprobs": LIST},
    "ChatCompletionTokenLogprob.top_logprobs[]": {"token": STR, "logprob": NUM, "bytes": (list, NULL)},
    "CreateChatCompletionStreamResponse": {"choices": LIST, "created": INT, "id": STR, "model": STR,
                                           "object": {"chat.completion.chunk"}},
    "CreateChatCompletionStreamResponse.choices[]": {
        "delta": OBJ, "finish_reason": {"stop", "length", "tool_calls", "content_filter", "function_call", None},
        "index": INT},
    "CompletionUsage": {"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT},
    "ListModelsResponse": {"object": {"list"}, "data": LIST},
    "Model": {"id": STR, "object": {"model"}, "created": INT, "owned_by": STR},
    "ErrorResponse": {"error": OBJ},
    "Error": {"type": STR, "message": STR, "param": (str, NULL), "code": (str, NULL)},
}
# Optional fields we send, with the types the document allows when present.
OPTIONAL: dict[str, dict[str, tuple | set]] = {
    "CompletionUsage": {"prompt_tokens_details": OBJ},
    "CompletionUsage.prompt_tokens_details": {"cached_tokens": INT},
    "ChatCompletionStreamResponseDelta": {"role": {"developer", "system", "user", "assistant", "tool"},
                                          "content": (str, NULL), "refusal": (str, NULL)},
    "CreateCompletionResponse.choices[].logprobs": {"text_offset": LIST, "token_logprobs": LIST, "tokens": LIST,
                                                    "top_logprobs": LIST},
}


def conforms(obj: dict, name: str, optional: bool = False) -> None:
    assert isinstance(obj, dict), f"{name}: {obj!r} is not an object"
    for field, allowed in (OPTIONAL if optional else REQUIRED)[name].items():
        if field not in obj:
            assert optional, f"{name}: required field {field!r} missing in {obj}"
            continue
        value = obj[field]
        if isinstance(allowed, set):
            assert value in allowed, f"{name}.{field} = {value!r}, allowed {allowed}"
        else:
            ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
            assert ok, f"{name}.{field} = {value!r} is not one of {allowed}"


def usage_conforms(usage: dict) -> None:
    conforms(usage, "CompletionUsage")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    conforms(usage, "CompletionUsage", optional=True)
    details = usage["prompt_tokens_details"]  # optional in the document; we send it always, as OpenAI does
    conforms(details, "CompletionUsage.prompt_tokens_details", optional=True)
    assert 0 <= details["cached_tokens"] < usage["prompt_tokens"]  # never the prompt's last token


def completion_conforms(body: dict, finished: bool) -> None:
    conforms(body, "CreateCompletionResponse")
    for choice in body["choices"]:
        conforms(choice, "CreateCompletionResponse.choices[]")
        if finished:
            assert choice["finish_reason"] is not None
        if choice["logprobs"] is not None:
            conforms(choice["logprobs"], "CreateCompletionResponse.choices[].logprobs", optional=True)
            assert all(isinstance(t, str) for t in choice["logprobs"]["tokens"])
            assert all(isinstance(v, float) for top in choice["logprobs"]["top_logprobs"] for v in top.values())
    if "usage" in body:  # optional, and not nullable, in CreateCompletionResponse
        usage_conforms(body["usage"])


def chat_logprobs_conform(logprobs: dict | None) -> None:
    if logprobs is None:
        return
    conforms(logprobs, "choices[].logprobs (chat)")
    for entry in logprobs["content"] or []:
        conforms(entry, "ChatCompletionTokenLogprob")
        for top in entry["top_logprobs"]:
            conforms(top, "ChatCompletionTokenLogprob.top_logprobs[]")


def chat_chunk_conforms(body: dict) -> None:
    conforms(body, "CreateChatCompletionStreamResponse")
    for choice in body["choices"]:
        conforms(choice, "CreateChatCompletionStreamResponse.choices[]")
        conforms(choice["delta"], "ChatCompletionStreamResponseDelta", optional=True)
        chat_logprobs_conform(choice.get("logprobs"))
    if body.get("usage") is not None:  # nullable in the stream response
        usage_conforms(body["usage"])


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1"],
                        tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


def post(server, path: str, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.base_url + path, content=body, headers={"content-type": "application/json"},
                          timeout=60)
    return httpx.post(server.base_url + path, json=body, timeout=60)


def stream_events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.base_url + path, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# --- responses conform to OpenAI's published schema -------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2, "n": 2}, {"echo": True}])
def test_completion_conforms(server, extra):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 3, **extra})
    assert r.status_code == 200, r.text
    completion_conforms(r.json(), finished=True)
    assert "usage" in r.json()


def test_streamed_completion_conforms(server):
    chunks = stream_events(server, "/v1/completions", {
        "model": MODEL, "prompt": ["Hello", "world"], "max_tokens": 3, "logprobs": 1, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True})
    for chunk in chunks:
        completion_conforms(chunk, finished=False)
    finals = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1] and all(c["finish_reason"] == "length" for c in finals)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2, "n": 2}])
def test_chat_completion_conforms(server, extra):
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                              "max_tokens": 3, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    conforms(body, "CreateChatCompletionResponse")
    usage_conforms(body["usage"])
    for choice in body["choices"]:
        conforms(choice, "CreateChatCompletionResponse.choices[]")
        conforms(choice["message"], "ChatCompletionResponseMessage")
        chat_logprobs_conform(choice["logprobs"])
        assert (choice["logprobs"] is not None) == bool(extra)


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_chat_conforms(server, include_usage):
    chunks = stream_events(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True,
        "logprobs": True, "top_logprobs": 1, "ignore_eos": True,
        "stream_options": {"include_usage": include_usage}})
    for chunk in chunks:
        chat_chunk_conforms(chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c["choices"] and c["choices"][0]["finish_reason"] == "length" for c in chunks)
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    else:
        assert all(c.get("usage") is None for c in chunks)


def test_models_conform(server):
    body = httpx.get(server.base_url + "/v1/models", timeout=10).json()
    conforms(body, "ListModelsResponse")
    assert body["data"]
    for card in body["data"]:
        conforms(card, "Model")


@pytest.mark.parametrize("path,body,status", [
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "ghost", "prompt": "x"}, 404),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", b'{"model": ', 400),
])
def test_errors_conform(server, path, body, status):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    conforms(r.json(), "ErrorResponse")
    conforms(r.json()["error"], "Error")


# --- requests are validated strictly -------------------------------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}

UNSUPPORTED = [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),
    ("tool_choice", "required"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("min_tokens", 4),
    ("logit_bias", {"42": 5}),
    ("parallel_tool_calls", True),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
    ("no_such_field", 1),
]


@pytest.mark.parametrize("field,value", UNSUPPORTED, ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_chat_fields_are_refused_naming_the_field(server, field, value):
    r = post(server, "/v1/chat/completions", {**CHAT, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and "not supported" in err["message"]


@pytest.mark.parametrize("field,value", [("best_of", 2), ("min_tokens", 1), ("response_format", {"type": "text"}),
                                         ("tools", []), ("suffix", "end"), ("logit_bias", {"1": -100})])
def test_unsupported_completion_fields_are_refused_naming_the_field(server, field, value):
    r = post(server, "/v1/completions", {**COMPLETION, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and "not supported" in err["message"]


def test_no_op_values_and_bookkeeping_fields_are_accepted(server):
    bookkeeping = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}
    r = post(server, "/v1/chat/completions", {**CHAT, **bookkeeping, "response_format": {"type": "text"},
                                              "tool_choice": "none", "logit_bias": {}})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {**COMPLETION, **bookkeeping, "best_of": 1, "suffix": None,
                                         "temperature": 1, "top_p": 1})  # ints where floats are due
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,field,value", [
    ("/v1/completions", "max_tokens", "5"),
    ("/v1/completions", "max_tokens", True),
    ("/v1/completions", "max_tokens", 2.0),
    ("/v1/completions", "temperature", "0.5"),
    ("/v1/completions", "stream", "yes"),
    ("/v1/completions", "stream", 1),
    ("/v1/completions", "n", "2"),
    ("/v1/completions", "echo", 0),
    ("/v1/completions", "seed", "7"),
    ("/v1/chat/completions", "logprobs", "true"),
    ("/v1/chat/completions", "top_p", [1]),
    ("/v1/chat/completions", "stream_options", {"include_usage": "yes"}),
])
def test_wrongly_typed_values_are_refused_not_coerced(server, path, field, value):
    base = COMPLETION if path == "/v1/completions" else CHAT
    r = post(server, path, {**base, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0] == field


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt.1"),
    ("/v1/completions", '{"model": "tiny", "prompt": "a", "stop": ["\\ud83d"]}', "stop.0"),
    ("/v1/completions", '{"model": "tiny\\ud800", "prompt": "a"}', "model"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "\\ud800", "content": "x"}]}',
     "messages.0.role"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x", "name": "\\udc00"}]}',
     "messages.0.name"),
    ("/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x", "\\ud800": 1}]}',
     "messages.0"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "user": "\\ud800"}',
     "user"),
])
def test_lone_surrogates_are_refused_with_400(server, path, body, param):
    r = post(server, path, body.encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]  # the body is valid JSON: the bad string is not echoed
    assert err["param"] == param and "surrogate" in err["message"]
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200  # and the server serves on


def test_seed_outside_int64_is_refused(server):
    r = post(server, "/v1/completions", {**COMPLETION, "seed": 18446744073709551616})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


# --- /openapi.json documents what the server does -------------------------------------------


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(server.base_url + "/openapi.json", timeout=10).json()


def test_openapi_documents_400_not_422_and_error_bodies(openapi):
    error_ref = "#/components/schemas/ErrorResponse"
    for path, item in openapi["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (method, path)
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = openapi["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "413", "503"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == error_ref, (path, status)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "401" in openapi["paths"]["/v1/models"]["get"]["responses"]
    assert "HTTPValidationError" not in openapi["components"]["schemas"]


def test_openapi_documents_the_cached_prompt_tokens(openapi):
    schemas = openapi["components"]["schemas"]
    details = schemas["Usage"]["properties"]["prompt_tokens_details"]
    assert "prompt_tokens_details" in schemas["Usage"]["required"]
    assert schemas[details["$ref"].rsplit("/", 1)[1]]["required"] == ["cached_tokens"]


def test_openapi_documents_the_enforced_limits(openapi):
    schemas = openapi["components"]["schemas"]

    def prop(model: str, name: str) -> dict:
        schema = schemas[model]["properties"][name]
        return next((s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"), schema)

    for model in ("CompletionRequest", "ChatCompletionRequest"):
        assert schemas[model]["additionalProperties"] is False
        assert prop(model, "max_tokens")["minimum"] == 1
        assert (prop(model, "n")["minimum"], prop(model, "n")["maximum"]) == (1, 16)
        assert (prop(model, "temperature")["minimum"], prop(model, "temperature")["maximum"]) == (0, 2)
    assert prop("ChatCompletionRequest", "messages")["minItems"] == 1
    prompt_forms = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert all(f.get("minLength", f.get("minItems")) == 1 for f in prompt_forms)
