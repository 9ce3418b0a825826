"""VTC counters under async scheduling (server/engine/policies/vtc.py): a step is scheduled, and
its output token charged, before the host has seen the token before it; when that token ends the
request (a stop token, EOS) or the request is aborted meanwhile, the charged token is never
delivered and is given back. So the same workload leaves the same per-tenant counters in both
modes, each exactly (w_p * prompt tokens + w_q * output tokens delivered) / tenant weight.
"""

from __future__ import annotations

import pytest

from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W_P, W_Q = 1.0, 2.0
WEIGHTS = {"a": 1.0, "b": 2.0}  # b's counter moves at half speed: exact halves in float
STOPS = tuple(range(2, 320, 4))  # a quarter of the vocabulary: seeded samples hit one after a few tokens


def engine(model_dir, async_scheduling: bool) -> LLMEngine:
    cfg = Config()
    cfg.model.dtype, cfg.model.device = "float32", "cpu"
    cfg.cache.kv_cache_memory = 8 << 20
    cfg.cache.prefix_caching = False  # every prompt token computed, so charged once
    cfg.scheduler.async_scheduling = async_scheduling
    cfg.scheduler.scheduling = "vtc"
    cfg.scheduler.vtc_input_weight, cfg.scheduler.vtc_output_weight = W_P, W_Q
    cfg.scheduler.max_num_seqs = 4
    cfg.scheduler.max_num_batched_tokens = 32
    cfg.lora.enabled = False
    e = LLMEngine(cfg, model_dir)
    e.set_tenant_weights(WEIGHTS)
    return e


def workload() -> list[GenerationRequest]:
    """Stop-token ends (seeded sampling, so batch-independent), EOS and length ends, both tenants."""
    out = []
    for i in range(8):
        tenant = "ab"[i % 2]
        prompt = [3 + i, 40 + 7 * i, 90 + i, 150 + 3 * i, 200 + i][: 3 + i % 3]
        if i % 4 == 3:  # runs to max_tokens
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=20, temperature=1.0, seed=100 + i, stop_token_ids=STOPS)
        out.append(GenerationRequest(f"r{i}", prompt, params, tenant=tenant))
    return out


ABORTED, ABORT_AFTER = "r1", 3  # aborted once it has this many tokens (a step of it still in flight if async)


def run(e: LLMEngine) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """-> the tenants' counters, what the module docstring says they must be, each request's finish."""
    requests = workload()
    for r in requests:
        e.add_request(r)
    delivered = {r.request_id: 0 for r in requests}
    finish = {}
    while e.has_unfinished():
        for out in e.step():
            assert out.error is None and out.request_id not in finish
            delivered[out.request_id] += len(out.token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason.value
        if ABORTED not in finish and delivered[ABORTED] >= ABORT_AFTER:
            finish[ABORTED] = e.abort(ABORTED).finish_reason.value
    expected = dict.fromkeys(WEIGHTS, 0.0)
    for r in requests:
        t = r.tenant
        expected[t] += (W_P * len(r.prompt_token_ids) + W_Q * delivered[r.request_id]) / WEIGHTS[t]
    assert e.allocator.num_used == 0
    return e.scheduler.policy.counters(), expected, finish


def test_async_and_sync_charge_exactly_the_tokens_delivered(tiny_llama_dir):
    sync_counters, sync_expected, sync_finish = run(engine(tiny_llama_dir, False))
    async_counters, async_expected, async_finish = run(engine(tiny_llama_dir, True))
    # the workload has teeth: requests end on stop tokens, at max_tokens, and by abort
    assert sync_finish == async_finish and set(sync_finish.values()) == {"stop", "length", "abort"}
    assert sync_expected == async_expected  # the same tokens delivered in both modes
    assert sync_counters == sync_expected
    assert async_counters == async_expected


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_request_ended_by_non_finite_logits_pays_only_its_delivered_tokens(tiny_llama_dir, tmp_path,
                                                                             async_scheduling):
    from non_finite_model import BAD_PROMPT, poisoned_copy

    e = engine(poisoned_copy(tiny_llama_dir, tmp_path / "poisoned").path, async_scheduling)
    e.add_request(GenerationRequest("bad", BAD_PROMPT, SamplingParams(max_tokens=8, temperature=0.0), tenant="a"))
    delivered, outs = 0, []
    while e.has_unfinished():
        for out in e.step():
            delivered += len(out.token_ids)
            outs.append(out)
    # the prefill's token, then NaN logits at the first decode (tests/non_finite_model.py)
    assert delivered == 1 and outs[-1].error_code == "non_finite_logits"
    assert e.scheduler.policy.counters()["a"] == W_P * len(BAD_PROMPT) + W_Q * delivered


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_request_failed_by_a_step_lost_at_read_back_pays_no_output_token(tiny_llama_dir, monkeypatch,
                                                                           async_scheduling):
    from server.engine.sampler import SampledStep

    output, faults = SampledStep.output, [1]

    def faulty(self):  # the prefill's tokens cannot be read back (a device fault shows only then)
        if faults:
            faults.pop()
            raise RuntimeError("device fault")
        return output(self)
    monkeypatch.setattr(SampledStep, "output", faulty)
    e = engine(tiny_llama_dir, async_scheduling)
    prompt = [5, 60, 70, 80]
    e.add_request(GenerationRequest("lost", prompt, SamplingParams(max_tokens=6, temperature=0.0), tenant="b"))
    outs = []
    while e.has_unfinished():
        outs += e.step()
    assert [o.finish_reason.value for o in outs] == ["error"] and not any(o.token_ids for o in outs)
    assert e.scheduler.policy.counters()["b"] == W_P * len(prompt) / WEIGHTS["b"]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_request_failed_by_a_step_that_cannot_launch_pays_no_token_of_it(tiny_llama_dir, async_scheduling, when):
    # the step's sampled token is charged when it is scheduled; a launch that raises (a bug the
    # request's data triggers) runs it apart and retires it: that token is never made
    e = engine(tiny_llama_dir, async_scheduling)
    prompt = [5, 60, 70, 80]
    e.add_request(GenerationRequest("bad", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                                    tenant="a"))
    execute = e.runner.execute
    fail_at = 0 if when == "prefill" else 2  # the launch that raises: the prefill's, or a decode's

    def faulty(chunks, *args, **kwargs):
        nonlocal fail_at
        fail_at -= 1
        if fail_at == -1:
            raise RuntimeError("bad step")
        return execute(chunks, *args, **kwargs)
    e.runner.execute = faulty
    delivered, outs = 0, []
    while e.has_unfinished():
        for out in e.step():
            delivered += len(out.token_ids)
            outs.append(out)
    assert outs[-1].finish_reason.value == "error" and delivered == (0 if when == "prefill" else 2)
    assert e.scheduler.policy.counters()["a"] == W_P * len(prompt) + W_Q * delivered


def test_a_request_lost_at_read_back_while_its_next_step_cannot_launch_pays_no_token(tiny_llama_dir, monkeypatch):
    # async: the decode step is scheduled (its token charged), its launch raises, and taking in
    # the prefill in flight finds that step lost too: the request ends before either token exists
    from server.engine.sampler import SampledStep

    output, faults = SampledStep.output, [1]

    def faulty_output(self):
        if faults:
            faults.pop()
            raise RuntimeError("device fault")
        return output(self)
    monkeypatch.setattr(SampledStep, "output", faulty_output)
    e = engine(tiny_llama_dir, True)
    execute, launches = e.runner.execute, []

    def faulty_execute(chunks, *args, **kwargs):
        launches.append(len(launches))
        if len(launches) == 2:
            raise RuntimeError("bad step")
        return execute(chunks, *args, **kwargs)
    e.runner.execute = faulty_execute
    prompt = [5, 60, 70, 80]
    e.add_request(GenerationRequest("lost", prompt, SamplingParams(max_tokens=6, temperature=0.0), tenant="a"))
    outs = []
    while e.has_unfinished():
        outs += e.step()
    assert [o.finish_reason.value for o in outs] == ["error"] and len(launches) == 2
    assert e.scheduler.policy.counters()["a"] == W_P * len(prompt)


@pytest.mark.parametrize("new_weight", [4.0, 0.25])
def test_a_token_given_back_after_a_weight_change_is_the_one_charged(tiny_llama_dir, new_weight):
    # async: an abort between steps finds one step's token charged and not delivered; the
    # tenant's weight changed since it was charged (a tenants-file reload)
    e = engine(tiny_llama_dir, True)
    prompt = [5, 60, 70, 80]
    e.add_request(GenerationRequest("r", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                                    tenant="a"))
    delivered = 0
    while delivered < 3:
        delivered += sum(len(out.token_ids) for out in e.step())
    e.set_tenant_weights({**WEIGHTS, "a": new_weight})
    assert e.abort("r").finish_reason.value == "abort"
    # every token it was charged for was charged at weight 1: exactly what it got, at weight 1
    assert e.scheduler.policy.counters()["a"] == W_P * len(prompt) + W_Q * delivered


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_stop_string_found_in_the_server_process_charges_only_the_tokens_up_to_it(tiny_llama_dir, tmp_path, mode):
    """--engine-process on: the server process finds stop strings; the core runs on until its
    FINISH arrives, and the tokens of those steps, cut here, are never delivered: the tenant must
    not pay for them, as it does not in-process (a request pays for what its client got)."""
    import httpx

    from server_process import ServerProcess

    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--dtype", "float32",
                         "--num-threads", "1", "--kv-cache-memory", "8MiB", "--no-lora", "--no-prefix-caching",
                         "--scheduling", "vtc", "--vtc-input-weight", str(W_P), "--vtc-output-weight", str(W_Q),
                         "--async-scheduling", "--engine-process", mode], tmp_path / "server.log")
    try:
        def complete(**extra) -> dict:
            body = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 40, "temperature": 0.0,
                    "ignore_eos": True, **extra}
            r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        full = complete()
        text = full["choices"][0]["text"]
        stop = text[8:12]  # a few tokens in: a stop string the greedy answer completes early
        assert stop.strip() and stop not in text[:8]
        cut = complete(stop=[stop])
        assert cut["choices"][0]["finish_reason"] == "stop" and cut["usage"]["completion_tokens"] < 40
        expected = sum(W_P * r["usage"]["prompt_tokens"] + W_Q * r["usage"]["completion_tokens"] for r in (full, cut))
        vtc = srv.metric("loramux_tenant_virtual_tokens")
    finally:
        srv.stop()
    assert vtc == expected
