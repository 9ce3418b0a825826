"""What a client of OpenAI's API relies on, found by black-box testing a running server:
usage counts, fields that only mean something together, streamed logprob offsets, error
codes and params, and retrieving one model. Each test failed on the code before its fix
(noted per test).
"""

from __future__ import annotations

import functools
import gzip
import json
import random

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file

from peft_adapters import make_peft_adapter
from server_process import ServerProcess

BASE = "tiny"
KEYS = {"acme": "key-acme", "beta": "key-beta"}
ADMIN = "key-admin"
CHAT = [{"role": "user", "content": "Hello world, hello tokens!"}]


@pytest.fixture(scope="module")
def uploads(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    make_peft_adapter(tiny_llama_dir, root / "mine", seed=4, r=4, lora_alpha=4, target_modules=["q_proj"])
    nan = make_peft_adapter(tiny_llama_dir, root / "nanny", seed=5, r=4, lora_alpha=4, target_modules=["q_proj"])
    weights = load_file(nan / "adapter_model.safetensors")  # listed at start; fails its first full load
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, nan / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def server(tiny_llama_dir, uploads, tmp_path_factory):
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", BASE, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", str(uploads),
                         "--allowed-adapter-roots", str(uploads), "--admin-key", ADMIN,
                         "--api-keys", *(f"{key}={name}" for name, key in KEYS.items())],
                        tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


def client_of(server, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def post(server, path: str, body: dict, tenant: str = "acme") -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS[tenant]}"})


def assert_error(r: httpx.Response, status: int, param: str | None, code: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_chat_with_n_choices_counts_its_prompt_once(server):
    """Before: a non-streamed chat completion with n=3 reported 3x the prompt tokens (the
    streamed one, and OpenAI, count the one prompt once)."""
    client = client_of(server)
    one = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, temperature=0)
    three = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, n=3, seed=7,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, n=3, seed=7,
                                                 extra_body={"ignore_eos": True}, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = chunks[-1].usage
    assert three.usage.prompt_tokens == one.usage.prompt_tokens == streamed.prompt_tokens
    assert three.usage.completion_tokens == streamed.completion_tokens == 12
    assert three.usage.total_tokens == one.usage.prompt_tokens + 12


@pytest.mark.parametrize("extra", [{"top_logprobs": 2}, {"top_logprobs": 0, "logprobs": False}])
def test_top_logprobs_without_logprobs_is_a_400(server, extra):
    """Before: silently ignored (200 without logprobs); OpenAI and vLLM answer 400."""
    r = post(server, "/v1/chat/completions", {"model": BASE, "messages": CHAT, "max_tokens": 2, **extra})
    assert_error(r, 400, "top_logprobs", "invalid_value")


@pytest.mark.parametrize("max_tokens", [2, 5])
def test_max_tokens_together_with_max_completion_tokens_is_a_400(server, max_tokens):
    """Before: max_tokens was silently ignored (200 with max_completion_tokens' length); OpenAI
    answers 400 naming max_tokens (deprecated in favour of max_completion_tokens), equal values too."""
    r = post(server, "/v1/chat/completions", {"model": BASE, "messages": CHAT, "max_tokens": max_tokens,
                                              "max_completion_tokens": 2})
    assert_error(r, 400, "max_tokens", "invalid_value")
    for field in ("max_tokens", "max_completion_tokens"):  # each alone is fine
        ok = post(server, "/v1/chat/completions", {"model": BASE, "messages": CHAT, field: 2, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/completions", {"prompt": "Hello"}),
])
def test_stream_options_without_stream_is_a_400(server, path, body):
    """Before: accepted and ignored (no usage chunk can come without a stream)."""
    r = post(server, path, {"model": BASE, "max_tokens": 2, "stream_options": {"include_usage": True}, **body})
    assert_error(r, 400, "stream_options", "invalid_value")
    ok = post(server, path, {"model": BASE, "max_tokens": 2, "stream_options": None, **body})
    assert ok.status_code == 200, ok.text


def test_streamed_text_offsets_go_on_from_chunk_to_chunk(server):
    """Before: every streamed chunk's text_offset started again at 0."""
    body = {"model": BASE, "prompt": "Hello world", "max_tokens": 8, "temperature": 0, "logprobs": 1,
            "ignore_eos": True}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    streamed: list[int] = []
    with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS['acme']}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0]["logprobs"]["text_offset"]
    lengths = [len(t) for t in whole["tokens"]]
    assert whole["text_offset"] == [sum(lengths[:i]) for i in range(8)]
    assert streamed == whole["text_offset"]


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"repetition_penalty": 5e-324}, "repetition_penalty"),
    ("/v1/completions", {"repetition_penalty": 0.001}, "repetition_penalty"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"stop": [str(i) for i in range(17)]}, "stop"),
    ("/v1/completions", {"n": 17}, "n"),
])
def test_a_value_out_of_range_is_invalid_value(server, path, extra, param):
    """Before: `invalid_request`, where docs/limits.md promises `invalid_value` (kept for a
    missing field or a wrong type, last case)."""
    body = {"messages": CHAT} if "chat" in path else {"prompt": "Hello"}
    assert_error(post(server, path, {"model": BASE, **body, **extra}), 400, param, "invalid_value")
    assert_error(post(server, path, {"model": BASE, **body, "temperature": "0.5"}), 400, "temperature",
                 "invalid_request")


@pytest.mark.parametrize("ids", [[5, 928224197611252], [5, 2**63 - 1], [5, 10**6]])
def test_echo_of_token_ids_past_the_vocabulary_is_a_400(server, ids):
    """Found by the API fuzzer: with `echo`, the prompt was decoded before it was validated, and an
    id past 2^32 made the tokenizer raise OverflowError: a 500."""
    r = post(server, "/v1/completions", {"model": BASE, "prompt": ids, "echo": True, "max_tokens": 2})
    assert_error(r, 400, "prompt", "invalid_value")
    assert post(server, "/v1/completions", {"model": BASE, "prompt": [5, 6], "echo": True, "max_tokens": 2}
                ).status_code == 200  # ids in the vocabulary still echo (their shape: test_openai_schema.py)


def test_an_unsupported_content_part_names_the_message(server):
    """Before: param was pydantic's internal path, `messages.0.content.function-after[<lambda>(),
    list[TextContentPart]].0.image_url`."""
    image = [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]
    r = post(server, "/v1/chat/completions", {"model": BASE, "max_tokens": 2,
                                               "messages": [{"role": "user", "content": image}]})
    assert_error(r, 400, "messages.0.content", "unsupported")
    assert "image_url" in r.json()["error"]["message"]


def test_chat_context_errors_name_the_fields_the_client_sent(server):
    """Before: `param` was `prompt` (a completions field) for an over-long chat, and `max_tokens`
    when the client had sent `max_completion_tokens`."""
    r = post(server, "/v1/chat/completions", {"model": BASE, "messages": CHAT, "max_completion_tokens": 10**6})
    assert_error(r, 400, "max_completion_tokens", "invalid_value")
    r = post(server, "/v1/chat/completions", {"model": BASE, "messages": CHAT, "max_tokens": 10**6})
    assert_error(r, 400, "max_tokens", "invalid_value")
    long = [{"role": "user", "content": "Hello world " * 300}]  # > 512 tokens, < the pre-tokenizer cut
    r = post(server, "/v1/chat/completions", {"model": BASE, "messages": long})
    assert_error(r, 400, "messages", "invalid_value")


def test_a_model_can_be_retrieved_by_its_id(server, uploads):
    """Before: GET /v1/models/{model} was 404 `Not Found` for every id, so the openai client's
    `models.retrieve` failed. Another tenant's adapter answers as a missing one."""
    load = httpx.post(server.base_url + "/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "acme-only", "lora_path": str(uploads / "mine"), "tenant": "acme"},
                      headers={"Authorization": f"Bearer {ADMIN}"})
    assert load.status_code == 200, load.text
    acme, beta = client_of(server, "acme"), client_of(server, "beta")
    base = acme.models.retrieve(BASE)
    assert (base.id, base.object, base.max_model_len) == (BASE, "model", 512)
    assert acme.models.retrieve("mine").parent == BASE
    assert acme.models.retrieve("acme-only").id == "acme-only"
    for client, name in ((beta, "acme-only"), (acme, "nope")):
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve(name)
        assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    r = httpx.get(server.base_url + f"/v1/models/{BASE}", timeout=10)
    assert r.status_code == 401  # the key is checked as on the listing



def test_a_streamed_chat_gives_every_tokens_logprobs(server):
    """Before: a token whose text was held back (an incomplete UTF-8 character: the tiny model's
    vocabulary is mostly single bytes) was skipped with its logprobs, so a stream had fewer
    entries than tokens; the whole answer has one per token."""
    body = {"model": BASE, "messages": [{"role": "user", "content": "日本語のテキスト"}], "max_tokens": 32,
            "temperature": 1.0, "logprobs": True, "top_logprobs": 1, "ignore_eos": True}
    for seed in range(3):
        whole = post(server, "/v1/chat/completions", {**body, "seed": seed}).json()
        streamed = []
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=120,
                          json={**body, "seed": seed, "stream": True},
                          headers={"Authorization": f"Bearer {KEYS['acme']}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        streamed += (choice["logprobs"] or {"content": []})["content"]
        assert [e["token"] for e in streamed] == [e["token"] for e in whole["choices"][0]["logprobs"]["content"]]
        assert len(streamed) == whole["usage"]["completion_tokens"] == 32


@pytest.mark.parametrize("model", ["mine", "nope"])
def test_adapter_id_with_a_model_other_than_the_base_is_a_400(server, model):
    """Before: 404 "The model `mine` does not exist." for an adapter that does exist (and is
    served by `model` alone); now the 400 that `adapters` and `route` already gave."""
    r = post(server, "/v1/completions", {"model": model, "adapter_id": "mine", "prompt": "Hello", "max_tokens": 2})
    assert_error(r, 400, "model", "invalid_value")
    assert post(server, "/v1/completions", {"model": "mine", "prompt": "Hello", "max_tokens": 2}).status_code == 200


def test_an_empty_adapter_id_is_not_the_base(server):
    """Before: `adapter_id: ""` ran the base model silently, as if no adapter had been asked for."""
    r = post(server, "/v1/completions", {"model": BASE, "adapter_id": "", "prompt": "Hello", "max_tokens": 2})
    assert_error(r, 404, "adapter_id", "model_not_found")


@pytest.mark.parametrize("value", ["[" * 100_000 + "]" * 100_000, "9" * 5000])
def test_json_that_python_cannot_parse_is_invalid_json(server, value):
    """Before: 400 `http_error` "There was an error parsing the body" for JSON nested past the
    recursion limit or an integer too long to convert, where docs/limits.md says `invalid_json`."""
    body = '{"model": "%s", "prompt": "Hello", "max_tokens": 2, "seed": %s}' % (BASE, value)
    r = httpx.post(server.base_url + "/v1/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEYS['acme']}", "content-type": "application/json"})
    assert_error(r, 400, None, "invalid_json")


@pytest.mark.parametrize("encoding, says", [(None, "not UTF-8 text"), ("gzip", "Content-Encoding: gzip")])
def test_a_body_that_is_not_utf8_is_invalid_json_saying_so(server, encoding, says):
    """Before: a Latin-1 or a gzipped body got "too deeply nested, or a number too long", which
    it was neither; now the message names what the client can fix."""
    body = '{"model": "%s", "prompt": "caf\u00e9", "max_tokens": 2}' % BASE
    content = gzip.compress(body.encode()) if encoding else body.encode("latin-1")
    headers = {"Authorization": f"Bearer {KEYS['acme']}", "content-type": "application/json",
               **({"content-encoding": encoding} if encoding else {})}
    r = httpx.post(server.base_url + "/v1/completions", content=content, headers=headers, timeout=30)
    assert_error(r, 400, None, "invalid_json")
    assert says in r.json()["error"]["message"] and "nested" not in r.json()["error"]["message"]


def test_too_many_prompts_are_refused_before_they_are_tokenized(server):
    """Before: 20,000 prompts were all tokenized (2.6 s of CPU on the 2-core dev machine) before
    the 400 that no such request can run (prompts x n over --max-waiting); now it is answered from
    the body's shape. The first prompt overflows the context: tokenized first, it is what the
    400 would name."""
    many = ["hello " * 4000] + ["Hello world, hello tokens! " * 12] * 20_000
    r = post(server, "/v1/completions", {"model": BASE, "prompt": many, "max_tokens": 1})
    assert_error(r, 400, "n", "too_many_generations")


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_a_stream_that_fails_before_its_first_token_is_the_unstreamed_http_error(server, api):
    """Before: a streamed request whose store adapter fails its first full load got 200, then an
    SSE error event (the SDK raised a bare APIError while iterating), where the same request
    unstreamed gets 400 `adapter_invalid`; now the stream gets that 400 too. Several choices
    (and prompts): the first failure answers for all of them."""
    client = client_of(server)
    if api == "chat":
        create = functools.partial(client.chat.completions.create, messages=CHAT, n=2)
    else:
        create = functools.partial(client.completions.create, prompt=["Hello", "world"], n=2)
    with pytest.raises(openai.BadRequestError) as whole:
        create(model="nanny", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as streamed:
        list(create(model="nanny", max_tokens=2, stream=True))
    assert streamed.value.code == whole.value.code == "adapter_invalid"
    error = streamed.value.body  # the SDK's: the error object
    assert error == {**whole.value.body, "message": error["message"]} and error["message"]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_without_the_json_content_type_says_so(server, content_type):
    """Before: "body: Input should be a valid dictionary or object to extract fields from", the
    answer to `curl -d '{...}'` without `-H 'content-type: application/json'`."""
    headers = {"Authorization": f"Bearer {KEYS['acme']}", **({"content-type": content_type} if content_type else {})}
    body = json.dumps({"model": BASE, "prompt": "Hello", "max_tokens": 2})
    r = httpx.post(server.base_url + "/v1/completions", content=body, headers=headers, timeout=30)
    assert_error(r, 400, None, "invalid_request")
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    assert (content_type or "no Content-Type") in r.json()["error"]["message"]
    r = httpx.post(server.base_url + "/v1/completions", json=[1, 2], timeout=30,
                   headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert_error(r, 400, None, "invalid_request")
    assert r.json()["error"]["message"] == "the request body must be a JSON object"


# --- usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache held ------

BLOCK = 16  # the server's default --block-size: only whole blocks are reused, never the last token


def token_prompt(length: int, seed: int) -> list[int]:
    """A prompt of `length` token ids no other test sends (ids above <s> and </s>)."""
    return random.Random(seed).choices(range(2, 320), k=length)


def cacheable(num_prompt_tokens: int) -> int:
    """The prompt tokens a repeat finds cached: its whole blocks before its last token."""
    return (num_prompt_tokens - 1) // BLOCK * BLOCK


def complete(client: openai.OpenAI, prompt, stream: bool, **extra):
    """A completion's usage, from the response or (stream) from its final usage chunk."""
    if not stream:
        return client.completions.create(model=BASE, prompt=prompt, max_tokens=2, **extra).usage
    chunks = list(client.completions.create(model=BASE, prompt=prompt, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}, **extra))
    return chunks[-1].usage


@pytest.mark.parametrize("stream", [False, True])
def test_usage_reports_the_prompt_tokens_found_in_the_prefix_cache(server, stream):
    """Before: no `prompt_tokens_details` in usage, so a client could not see what the prefix
    cache saved. A repeated prompt of 45 tokens finds its first two blocks (32 tokens) cached;
    the cache is the tenant's own, so another tenant's same prompt finds nothing."""
    prompt = token_prompt(45, seed=10 + stream)
    first, second = (complete(client_of(server), prompt, stream) for _ in range(2))
    assert (first.prompt_tokens, first.prompt_tokens_details.cached_tokens) == (45, 0)
    assert (second.prompt_tokens, second.prompt_tokens_details.cached_tokens) == (45, cacheable(45)) == (45, 32)
    assert complete(client_of(server, "beta"), prompt, stream).prompt_tokens_details.cached_tokens == 0


def test_cached_tokens_count_each_prompt_once_whatever_n(server):
    """Before: absent. Counted as `prompt_tokens` is: a request's prompts summed, each once
    however many choices it has; the body's shape is OpenAI's, `{"cached_tokens": N}`."""
    a, b = token_prompt(45, seed=20), token_prompt(50, seed=21)
    client = client_of(server)
    for prompt in (a, b):
        complete(client, prompt, stream=False)
    expected = cacheable(45) + cacheable(50)
    assert expected == 32 + 48
    for stream in (False, True):
        got = complete(client, [a, b], stream, n=2)
        assert (got.prompt_tokens, got.prompt_tokens_details.cached_tokens) == (95, expected), stream
    body = post(server, "/v1/completions", {"model": BASE, "prompt": a, "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": cacheable(45)}


def test_chat_usage_reports_cached_prompt_tokens(server):
    """Before: absent in chat usage too, streamed or not."""
    client = client_of(server)
    messages = [{"role": "user", "content": "Prefix caching keeps the blocks of this sentence, all of them."}]
    first = client.chat.completions.create(model=BASE, messages=messages, max_tokens=2).usage
    assert first.prompt_tokens >= 40 and first.prompt_tokens_details.cached_tokens == 0
    expected = cacheable(first.prompt_tokens)
    chunks = list(client.chat.completions.create(model=BASE, messages=messages, max_tokens=2, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model=BASE, messages=messages, max_tokens=2, n=2).usage
    for usage in (chunks[-1].usage, whole):
        assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (first.prompt_tokens, expected)


def test_without_prefix_caching_nothing_is_cached(tiny_llama_dir, tmp_path_factory):
    """Before: absent. A server started with --no-prefix-caching computes every prompt in full
    and says so: 0, the field still present (OpenAI sends it on every response)."""
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", BASE, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--no-prefix-caching"],
                        tmp_path_factory.mktemp("logs") / "server.log")
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        prompt = token_prompt(45, seed=30)
        for stream in (False, True, False):
            assert complete(client, prompt, stream).prompt_tokens_details.cached_tokens == 0
        messages = [{"role": "user", "content": "Prefix caching keeps the blocks of this sentence, all of them."}]
        for _ in range(2):
            usage = client.chat.completions.create(model=BASE, messages=messages, max_tokens=2).usage
            assert usage.prompt_tokens >= 40 and usage.prompt_tokens_details.cached_tokens == 0
    finally:
        srv.stop()
