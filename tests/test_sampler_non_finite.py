"""Non-finite logits (server/engine/sampler.py, engine.py): a request whose logits row holds a NaN
(a numeric blow-up) ends with a `non_finite_logits` error instead of a made-up token, while the
requests sharing its steps keep transformers' tokens. The sampler marks the row on the device and
the mark rides back with the tokens (no extra read of the device); with async scheduling the step
launched before the host saw the mark decodes a valid token id for it, whose output is dropped.

The NaN comes from real input: a model with one token's embedding at infinity
(tests/non_finite_model.py). The CUDA-graph path: tests/test_cuda_graphs.py.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from engine_runs import cpu_engine
from non_finite_model import BAD_PROMPT, PoisonedModel, poisoned_copy
from server.engine.request import GenerationRequest, Sequence, SamplingParams
from server.engine.sampler import Sampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD = [[317, 84, 247, 85], [313, 308, 264, 203], [137, 12, 113, 151, 249, 75]]
NEW = 5


@pytest.fixture(scope="module")
def poisoned(tiny_llama_dir, tmp_path_factory) -> PoisonedModel:
    return poisoned_copy(tiny_llama_dir, tmp_path_factory.mktemp("poisoned"))


@pytest.fixture(scope="module")
def reference(poisoned) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy tokens and logprobs of GOOD on the poisoned model (all finite)."""
    from peft_adapters import peft_greedy

    ref = [peft_greedy(poisoned.path, None, p, NEW) for p in GOOD]
    for prompt, (tokens, logprobs) in zip(GOOD, ref):
        assert poisoned.token not in prompt + tokens and all(map(torch.isfinite, torch.tensor(logprobs)))
    return ref


def test_the_sampler_marks_rows_that_are_not_finite_on_the_host_only():
    from server.engine.sampler import NON_FINITE

    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, nan, 1.0], [-inf, -inf, -inf], [1.0, inf, 0.0],
                           [3.0, 0.0, -inf]])
    sampler = Sampler(torch.device("cpu"))

    def seqs(**params):
        return [Sequence.from_request(GenerationRequest(f"s{i}", [1], SamplingParams(**params)))
                for i in range(len(logits))]

    for params in (dict(temperature=0.0, logprobs=2), dict(temperature=0.7, top_p=0.9, seed=3),
                   dict(temperature=1.0, top_k=2, repetition_penalty=1.3)):
        step = sampler.sample(logits, seqs(**params))
        out = step.output()
        assert out.token_ids[1:4] == [NON_FINITE] * 3, params
        assert out.token_ids[0] != NON_FINITE and out.token_ids[4] != NON_FINITE
        assert ((step.tokens >= 0) & (step.tokens < 3)).all()  # the device keeps embeddable ids
        if params.get("logprobs") is not None:
            assert [lp is None for lp in out.logprobs] == [False, True, True, True, False]
        if params["temperature"] == 0.0:
            assert out.token_ids[0] == 1 and out.token_ids[4] == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_non_finite_row_fails_its_request_alone(poisoned, reference, async_scheduling):
    engine = cpu_engine(poisoned.path, None, async_scheduling=async_scheduling, prefix_caching=False)
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    requests = [GenerationRequest(f"good{i}", p, greedy) for i, p in enumerate(GOOD)]
    # NaN from its first decode (its prompt's greedy token is the poisoned one), with logprobs
    requests.append(GenerationRequest("decode", BAD_PROMPT, SamplingParams(max_tokens=NEW, temperature=0.0,
                                                                           ignore_eos=True, logprobs=2)))
    # NaN from its prefill, sampled (seeded, penalties, top-p): the random path marks it too
    requests.append(GenerationRequest("prefill", [5, 6, poisoned.token, 8], SamplingParams(
        max_tokens=NEW, temperature=0.8, top_p=0.9, seed=1, repetition_penalty=1.2, ignore_eos=True)))
    got = run(engine, requests)

    for i, (tokens, logprobs) in enumerate(reference):
        out = got[f"good{i}"]
        assert out["error"] is None and out["tokens"] == tokens
        assert out["logprobs"] == pytest.approx(logprobs, abs=1e-4)
    decode, prefill = got["decode"], got["prefill"]
    assert decode["tokens"] == [poisoned.token]  # transformers' first token, from the finite prefill
    assert decode["code"] == prefill["code"] == "non_finite_logits"
    assert "output token 2 " in decode["error"] and "output token 1 " in prefill["error"]
    assert prefill["tokens"] == [] and decode["finish"] == prefill["finish"] == "error"
    assert decode["usage"] == (len(BAD_PROMPT), 1) and prefill["usage"] == (4, 0)
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()
    # the engine keeps serving, on the blocks the NaN request wrote (freed first, so taken first)
    assert engine.kv_cache.tensor.isnan().any()
    again = run(engine, [GenerationRequest("again", GOOD[1], greedy)])["again"]
    assert again["error"] is None and again["tokens"] == reference[1][0]


def run(engine, requests: list[GenerationRequest]) -> dict[str, dict]:
    """Submit all, step until done: each request's tokens, logprobs, finish, error. An output after
    a request's end fails the test."""
    got = {r.request_id: dict(tokens=[], logprobs=[], finish=None, error=None, code=None, usage=None)
           for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for out in engine.step():
            res = got[out.request_id]
            assert res["finish"] is None, f"{out.request_id}: an output after its end"
            res["tokens"] += out.token_ids
            res["logprobs"] += [lp.logprob for lp in out.logprobs]
            res["error"], res["code"] = out.error, out.error_code
            if out.finished:
                res["finish"] = out.finish_reason.value
                res["usage"] = (out.num_prompt_tokens, out.num_output_tokens)
    return got


def test_over_http_the_non_finite_request_gets_an_error_and_a_concurrent_one_its_tokens(poisoned, reference,
                                                                                        tmp_path):
    """A real server (engine core process, async scheduling): the poisoned request gets a 500
    `non_finite_logits` error object (a numeric failure of the server's run of a valid request), or
    streamed, its first token's chunk then that error as the last SSE event; a request running at
    the same time gets transformers' tokens."""
    from tokenizers import Tokenizer

    from server_process import ServerProcess

    srv = ServerProcess(["--model", str(poisoned.path), "--served-model-name", "tiny", "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--no-lora", "--async-scheduling"],
                        tmp_path / "server.log")

    def post(prompt: list[int], stream: bool = False) -> httpx.Response:
        body = dict(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0, ignore_eos=True, stream=stream,
                    logprobs=0)
        return httpx.post(srv.base_url + "/v1/completions", json=body, timeout=120)

    try:
        with ThreadPoolExecutor(3) as pool:
            whole, streamed, good = [pool.submit(post, *args) for args in
                                     ((BAD_PROMPT,), (BAD_PROMPT, True), (GOOD[2],))]
            whole, streamed, good = whole.result(), streamed.result(), good.result()
        assert srv.proc.poll() is None and httpx.get(srv.base_url + "/health", timeout=10).status_code == 200
    finally:
        srv.stop()

    assert whole.status_code == 500, whole.text
    error = whole.json()["error"]
    assert error["code"] == "non_finite_logits" and error["type"] == "server_error"
    assert "not finite" in error["message"] and "output token 2 " in error["message"]

    assert streamed.status_code == 200
    events = [json.loads(line[len("data: "):]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["error"]["code"] == "non_finite_logits", events
    assert all("error" not in e and e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[:-1]) == 1  # its one finite token
    text = Tokenizer.from_file(str(poisoned.path / "tokenizer.json"))

    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["text"] == text.decode(reference[2][0])
    assert good.json()["usage"]["completion_tokens"] == NEW
