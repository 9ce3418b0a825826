"""The OpenAI API against a real server process, with the unchanged `openai` client and httpx.

Expected texts come from transformers (greedy `generate` on the same weights), never from
our own output.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import save_tiny_model
from server_process import ServerProcess

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--max-waiting", "64", "--num-threads", "1",
                         "--adapters-dir", ""],  # the demo store is for SmolLM2, not this model
                        tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """Greedy continuations and logprobs from transformers, plus the tokenizer."""
    import transformers
    from tokenizers import Tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))

    def greedy(prompt: str, n: int) -> tuple[list[int], torch.Tensor]:
        ids = torch.tensor([tok.encode(prompt).ids])
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, min_new_tokens=n,
                             pad_token_id=0, output_scores=True, output_logits=True, return_dict_in_generate=True)
        logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
        return out.sequences[0, ids.shape[1]:].tolist(), logprobs

    return greedy, tok


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_completion_greedy_matches_transformers(client, reference):
    greedy, tok = reference
    prompt = "The quick brown fox"
    tokens, _ = greedy(prompt, 12)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(tokens)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(tok.encode(prompt).ids)


def test_streaming_equals_non_streaming_and_reports_usage(client, reference):
    greedy, tok = reference
    tokens, _ = greedy("Hello world", 16)
    stream = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tok.decode(tokens)
    assert chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming(client):
    messages = [{"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    parts = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
    chunks = list(parts)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_match_transformers(client, reference):
    greedy, tok = reference
    tokens, ref_logprobs = greedy("Paris is", 5)
    r = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    for i, token in enumerate(tokens):
        assert lp.token_logprobs[i] == pytest.approx(ref_logprobs[i, token].item(), abs=1e-4)
        top_ids = ref_logprobs[i].topk(3).indices.tolist()
        assert set(lp.top_logprobs[i]) == {tok.decode([t]) for t in top_ids}


def test_stop_string_truncates_like_the_reference(client, reference):
    greedy, tok = reference
    tokens, _ = greedy("The quick", 20)
    full = tok.decode(tokens)
    stop = full[5:7]  # a string the reference output is known to contain
    r = client.completions.create(model=MODEL, prompt="The quick", max_tokens=20, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_batch_independent(client):
    kwargs = dict(model=MODEL, prompt="Once", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234,
                  extra_body={"ignore_eos": True, "top_k": 50})
    alone = client.completions.create(**kwargs).choices[0].text

    async def crowd():
        aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key="unused", max_retries=0)
        others = [aclient.completions.create(model=MODEL, prompt=f"noise {i}", max_tokens=12, temperature=1.0)
                  for i in range(5)]
        results = await asyncio.gather(aclient.completions.create(**kwargs), *others)
        return results[0].choices[0].text

    assert asyncio.run(crowd()) == alone
    different = client.completions.create(**{**kwargs, "seed": 99}).choices[0].text
    assert different != alone


def test_n_choices(client):
    r = client.completions.create(model=MODEL, prompt="a", max_tokens=4, n=3, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 12


@pytest.mark.parametrize("body,status,param", [
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "word " * 600}, 400, "prompt"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 999_999]}, 400, "prompt"),
    ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    if status == 404:
        assert err["code"] == "model_not_found"


def test_malformed_json_and_wrong_types(server):
    url = server.base_url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, json={"model": MODEL, "messages": "not a list"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    r = httpx.post(url, json={"model": MODEL, "messages": []})
    assert r.status_code == 400


def test_unknown_model_raises_not_found_in_the_openai_client(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"


def test_client_disconnect_mid_stream_aborts_and_server_keeps_serving(server, client):
    aborted_before = server.metric("loramux_requests_total", 'finish_reason="abort"')
    body = {"model": MODEL, "prompt": "long", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    # The engine notices within a step or two; poll the metrics (bounded) rather than sleep blindly.
    deadline = time.monotonic() + 30
    while (aborted := server.metric("loramux_requests_total", 'finish_reason="abort"')) == aborted_before:
        assert time.monotonic() < deadline, "the disconnect was not counted as an abort within 30 s"
        time.sleep(0.1)
    assert aborted == aborted_before + 1
    r = client.completions.create(model=MODEL, prompt="still there?", max_tokens=3)
    assert r.choices[0].text is not None


def test_a_client_gone_before_its_first_token_aborts_its_request_at_once(tmp_path):
    """A stream's headers wait for its first output (a failure before it is then an HTTP status);
    a client that leaves meanwhile must still abort its request at once, not once it has run.
    --max-num-seqs 1: one long stream runs (~8,000 tokens, over 10 s), the second request waits
    behind it in the engine. Before: the headers came at once."""
    model = save_tiny_model(tmp_path / "long", "llama", max_position_embeddings=8192)
    srv = ServerProcess(["--model", str(model), "--served-model-name", MODEL, "--dtype", "float32", "--no-lora",
                         "--num-threads", "1", "--max-model-len", "8192", "--kv-cache-memory", "64MiB",
                         "--max-num-seqs", "1"], tmp_path / "one-seq.log")
    try:
        body = {"model": MODEL, "prompt": "long", "max_tokens": 8000, "stream": True, "ignore_eos": True}
        url = srv.base_url + "/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as running:
            lines = running.iter_lines()  # held: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            with pytest.raises(httpx.ReadTimeout):  # no headers: it has no token yet
                with httpx.stream("POST", url, json={**body, "max_tokens": 4}, timeout=httpx.Timeout(60, read=1)):
                    pass
            deadline = time.monotonic() + 30
            while srv.metric("loramux_requests_total", 'finish_reason="abort"') == 0:
                assert time.monotonic() < deadline, "the disconnect was not counted as an abort within 30 s"
                time.sleep(0.1)
            # the long stream still runs: the waiting request was aborted, not run after it
            assert srv.metric("loramux_requests_total", 'finish_reason="length"') == 0
            assert srv.metric("loramux_requests_waiting") == 0 and srv.metric("loramux_requests_running") == 1
    finally:
        srv.stop()


def test_overload_gets_503_and_everyone_else_is_served(tiny_llama_dir, tmp_path):
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32",
                         "--max-waiting", "4", "--num-threads", "1"], tmp_path / "overload.log")
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as c:
                # Long enough that the first 4 are still generating while the loop takes in the
                # other 12 (it shares the GIL with the engine thread, more so on a busy machine).
                body = {"model": MODEL, "prompt": "hi", "max_tokens": 256, "ignore_eos": True}
                return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(16)])

        codes = [r.status_code for r in asyncio.run(burst())]
        assert set(codes) == {200, 503} and codes.count(200) >= 4
        assert httpx.get(srv.base_url + "/health").status_code == 200
    finally:
        srv.stop()


def test_metrics_exposed(server):
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("loramux_requests_total", "loramux_time_to_first_token_seconds", "loramux_kv_blocks_used",
                 "loramux_requests_running", "loramux_e2e_request_latency_seconds",
                 "loramux_time_per_output_token_seconds"):
        assert name in text


DEMO_ADAPTERS = ("french", "json", "pirate")


@pytest.mark.slow
def test_default_server_with_demo_adapters_answers_like_transformers_and_peft(default_model_dir, tmp_path):
    """What a new user gets from `make serve`: the default model and the demo adapters from
    adapters_store/, each answer equal to transformers (base) or PEFT (adapter) greedy output."""
    import peft
    import transformers
    from tokenizers import Tokenizer

    repo = Path(__file__).resolve().parent.parent
    srv = ServerProcess(["--dtype", "float32", "--kv-cache-memory", "64MiB"], tmp_path / "default.log")
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        cards = {m.id: m for m in client.models.list().data}
        base = next(m.id for m in cards.values() if m.parent is None)
        assert set(cards) == {base, *DEMO_ADAPTERS}
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answers = {name: client.chat.completions.create(model=name, messages=messages, max_tokens=30,
                                                        temperature=0)
                   for name in (base, *DEMO_ADAPTERS)}

        hf_tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
        tok = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(model, repo / "adapters_store" / DEMO_ADAPTERS[0],
                                               adapter_name=DEMO_ADAPTERS[0])
        for name in DEMO_ADAPTERS[1:]:
            model.load_adapter(repo / "adapters_store" / name, adapter_name=name)

        def reference(name: str) -> str:
            if name == base:
                with model.disable_adapter():
                    out = model.generate(**ids, max_new_tokens=30, do_sample=False)
            else:
                model.set_adapter(name)
                out = model.generate(**ids, max_new_tokens=30, do_sample=False)
            return tok.decode(out[0, ids["input_ids"].shape[1]:].tolist())

        for name, r in answers.items():
            assert r.choices[0].message.content == reference(name), name
            assert r.usage.prompt_tokens == ids["input_ids"].shape[1]
        texts = [r.choices[0].message.content for r in answers.values()]
        assert "Paris" in texts[0] and len(set(texts)) == len(texts)  # four visibly different answers
    finally:
        srv.stop()


def test_sse_wire_format(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
