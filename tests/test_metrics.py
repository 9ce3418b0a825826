"""Metrics: the `vllm:` series the Gateway API Inference Extension reads (names, types, labels,
as its model-server protocol and vLLM's loggers define them), queue gauges that follow every
change of state (not only engine steps), per-tenant series, and adapter series removed on unload."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from peft_adapters import make_peft_adapter
from server.config import Config
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.engine.request import FinishReason, GenerationRequest, SamplingParams
from server.metrics import FINISH_REASONS, REQUEST_STATUSES, Metrics
from server_process import ServerProcess

BASE = "tiny"
QV = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=4)
KEYS = {"key-alpha": "alpha", "key-beta": "beta"}
ADMIN = "admin-secret"
GIE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:gpu_cache_usage_perc")
LORA_INFO_LABELS = {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str | None = None, **labels) -> float:
    """Sum of the samples of `family` (named `sample`, default the family) whose labels include `labels`."""
    name = sample or family
    return sum(s.value for s in fams[family].samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_finish_reasons_are_the_engines():
    assert set(FINISH_REASONS) == {r.value for r in FinishReason}


# --- in-process: the gauges follow the state, with no engine step in between -------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory) -> LLMEngine:
    adapter = make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("a") / "racer", **QV)
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.model.num_threads = "float32", "cpu", 1
    cfg.model.served_model_name = BASE
    cfg.cache.kv_cache_memory = 8 << 20
    cfg.lora.adapters_dir, cfg.lora.lora_modules, cfg.lora.max_loras = None, {"racer": str(adapter)}, 3
    return LLMEngine(cfg, tiny_llama_dir)


def scrape(engine: LLMEngine) -> dict:
    return families(generate_latest(engine.metrics.registry).decode())


def lora_info(fams: dict) -> dict[str, str]:
    samples = fams["vllm:lora_requests_info"].samples
    assert len(samples) == 1, samples  # one series: the label values change, the series count does not grow
    return samples[0].labels


def test_gauges_follow_add_step_and_abort(engine):
    request = GenerationRequest("g1", [5, 6, 7, 8], SamplingParams(max_tokens=50, ignore_eos=True), adapter="racer")
    engine.add_request(request)
    fams = scrape(engine)  # no step yet
    assert value(fams, "vllm:num_requests_waiting", model_name=BASE, engine="0") == 1
    assert value(fams, "vllm:num_requests_running") == 0
    assert lora_info(fams) == {"max_lora": "3", "running_lora_adapters": "", "waiting_lora_adapters": "racer"}

    # The adapter loads on the loader thread, then the request runs: poll for it (how long the
    # load takes depends on the machine), stepping as the engine loop would.
    deadline = time.monotonic() + 60
    while not engine.scheduler.num_running:
        assert time.monotonic() < deadline, "the request was not scheduled within 60 s (its adapter did not load?)"
        engine.step()
        time.sleep(0.01)
    fams = scrape(engine)
    assert value(fams, "vllm:num_requests_running") == 1 and value(fams, "vllm:num_requests_waiting") == 0
    assert lora_info(fams) == {"max_lora": "3", "running_lora_adapters": "racer", "waiting_lora_adapters": ""}
    used = engine.allocator.num_used / engine.info.num_blocks
    assert 0 < used == value(fams, "vllm:kv_cache_usage_perc") == value(fams, "vllm:gpu_cache_usage_perc")
    assert abs(fams["vllm:lora_requests_info"].samples[0].value - time.time()) < 60  # a timestamp, as vLLM

    engine.abort("g1")
    fams = scrape(engine)  # no step after the abort
    for name in GIE_GAUGES:
        assert value(fams, name) == 0, name
    assert lora_info(fams)["running_lora_adapters"] == ""


def test_an_admission_shows_while_the_model_step_runs(engine, monkeypatch):
    """Scheduled into the running batch: the gauges say so before the (long) model step, not after."""
    seen = []
    execute = engine.runner.execute

    def observed(*args, **kwargs):
        fams = scrape(engine)
        seen.append((value(fams, "vllm:num_requests_running"), value(fams, "vllm:num_requests_waiting")))
        return execute(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", observed)
    engine.add_request(GenerationRequest("s1", [5, 6, 7], SamplingParams(max_tokens=1)))
    engine.step()
    assert seen == [(1, 0)]
    assert not engine.has_unfinished()


def test_a_request_handed_to_a_busy_engine_thread_counts_as_waiting(engine):
    """A router scraping while the engine thread is inside a long step must already see the
    request that arrived: it is counted from submit, not from when the engine takes it in."""
    async def main():
        bridge = AsyncEngine(engine, max_pending=8)
        bridge.start()
        inside, release = threading.Event(), threading.Event()
        try:
            busy = asyncio.ensure_future(bridge.call(lambda e: (inside.set(), release.wait(30))))
            assert await asyncio.to_thread(inside.wait, 30)  # the engine thread is busy now
            submit = asyncio.ensure_future(bridge.submit(
                GenerationRequest("w1", [5, 6, 7], SamplingParams(max_tokens=2))))
            await asyncio.sleep(0.05)  # submit has handed the request over and awaits admission
            during = scrape(engine)
            release.set()
            await busy
            stream = await submit
            outputs = [out async for out in stream]
            return during, outputs
        finally:
            release.set()
            bridge.shutdown()

    during, outputs = asyncio.run(main())
    assert value(during, "vllm:num_requests_waiting") == 1
    assert value(during, "loramux_requests_waiting") == 1
    assert outputs[-1].finished
    after = scrape(engine)
    assert value(after, "vllm:num_requests_waiting") == 0 and value(after, "vllm:num_requests_running") == 0


# --- over HTTP: a real server with two tenants and adapters ---------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    make_peft_adapter(tiny_llama_dir, store / "gamma", seed=1, **QV)
    make_peft_adapter(tiny_llama_dir, store / "delta", seed=2, **QV)
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", BASE, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", str(store),
                         "--max-loras", "2", "--admin-key", ADMIN,
                         "--api-keys", *[f"{k}={t}" for k, t in KEYS.items()]],
                        tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


def complete(server, key: str, model: str, max_tokens: int) -> dict:
    r = httpx.post(server.base_url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": model, "prompt": "hello there", "max_tokens": max_tokens, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def metrics_text(server) -> str:
    return httpx.get(server.base_url + "/metrics", timeout=10).text


def test_vllm_series_have_the_types_and_labels_the_extension_reads(server):
    before = families(metrics_text(server))
    sent = [complete(server, "key-alpha", model, 6) for model in (BASE, "gamma", "delta")]
    fams = families(metrics_text(server))

    for name in GIE_GAUGES:
        assert fams[name].type == "gauge", name
        assert [s.labels for s in fams[name].samples] == [{"model_name": BASE, "engine": "0"}], name
        assert value(fams, name) == 0, name  # idle again
    info = fams["vllm:lora_requests_info"]
    assert info.type == "gauge" and set(lora_info(fams)) == LORA_INFO_LABELS
    assert lora_info(fams)["max_lora"] == "2"
    assert abs(info.samples[0].value - time.time()) < 60
    config = fams["vllm:cache_config_info"]
    assert config.type == "gauge" and {"block_size", "num_gpu_blocks"} <= set(config.samples[0].labels)

    # Counters: the family without `_total`, the samples with it (prometheus_client's parser).
    def grew(family: str, sample: str, **labels) -> float:
        return value(fams, family, sample, **labels) - value(before, family, sample, **labels)

    for family in ("vllm:request_success", "vllm:prompt_tokens", "vllm:generation_tokens"):
        assert fams[family].type == "counter", family
    assert grew("vllm:request_success", "vllm:request_success_total", finished_reason="length") == len(sent)
    assert grew("vllm:prompt_tokens", "vllm:prompt_tokens_total", model_name=BASE) == \
        sum(u["prompt_tokens"] for u in sent)
    assert grew("vllm:generation_tokens", "vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in sent)
    for family in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                   "vllm:request_queue_time_seconds", "vllm:request_time_per_output_token_seconds"):
        assert fams[family].type == "histogram", family
        assert grew(family, family + "_count") == len(sent), family  # per request
    for family in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert fams[family].type == "histogram", family
        assert [s.labels for s in fams[family].samples if s.name == family + "_count"] == \
            [{"model_name": BASE, "engine": "0"}], family
        # per output token after each request's first (before: once per request)
        assert grew(family, family + "_count") == sum(u["completion_tokens"] - 1 for u in sent), family


def test_lora_info_names_the_adapter_of_a_running_stream(server):
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=120,
                      headers={"Authorization": "Bearer key-beta"},
                      json={"model": "gamma", "prompt": "hi", "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the first token: it runs now
        during = families(metrics_text(server))
        for _ in lines:
            pass
    assert lora_info(during)["running_lora_adapters"] == "gamma"
    assert value(during, "vllm:num_requests_running") == 1
    assert lora_info(families(metrics_text(server)))["running_lora_adapters"] == ""


def test_per_tenant_series(server):
    before = families(metrics_text(server))
    alpha = [complete(server, "key-alpha", BASE, 5) for _ in range(2)]
    beta = [complete(server, "key-beta", "gamma", 7) for _ in range(3)]
    fams = families(metrics_text(server))

    def grew(family: str, sample: str, **labels) -> float:
        return value(fams, family, sample, **labels) - value(before, family, sample, **labels)

    for tenant, usage in (("alpha", alpha), ("beta", beta)):
        assert grew("loramux_tenant_requests", "loramux_tenant_requests_total", tenant=tenant,
                    status="length") == len(usage)
        assert grew("loramux_tenant_generation_tokens", "loramux_tenant_generation_tokens_total",
                    tenant=tenant) == sum(u["completion_tokens"] for u in usage)
        assert grew("loramux_tenant_prompt_tokens", "loramux_tenant_prompt_tokens_total",
                    tenant=tenant) == sum(u["prompt_tokens"] for u in usage)
        for family in ("loramux_tenant_time_to_first_token_seconds", "loramux_tenant_queue_time_seconds"):
            assert grew(family, family + "_count", tenant=tenant) == len(usage), (family, tenant)
    # Every configured tenant has every status from the start (refusals too): dashboards show 0, not nothing.
    statuses = {(s.labels["tenant"], s.labels["status"]) for s in fams["loramux_tenant_requests"].samples
                if s.name.endswith("_total")}
    assert statuses == {(t, s) for t in KEYS.values() for s in REQUEST_STATUSES}
    vtc = {s.labels["tenant"] for s in fams["loramux_tenant_virtual_tokens"].samples}
    assert vtc == set(KEYS.values()) and fams["loramux_tenant_virtual_tokens"].type == "gauge"


def test_an_unloaded_adapters_series_are_removed(server):
    complete(server, "key-alpha", "delta", 3)
    complete(server, "key-alpha", "gamma", 3)

    def adapters_in(text: str) -> set[str]:
        return {s.labels.get("adapter") for f in text_string_to_metric_families(text) for s in f.samples} - {None}

    assert {"delta", "gamma"} <= adapters_in(metrics_text(server))
    r = httpx.post(server.base_url + "/v1/unload_lora_adapter", json={"lora_name": "delta"},
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    left = adapters_in(metrics_text(server))
    assert "delta" not in left and "gamma" in left


def test_a_counted_histogram_exposes_what_one_observation_per_token_would():
    """One step's LoRA tokens are observed as (experts, count) pairs; the exposition must be the
    one prometheus_client's Histogram gives for the same tokens observed one by one."""
    from prometheus_client import CollectorRegistry, Histogram

    from server.metrics import CountedHistogram

    buckets = (1, 2, 3, 4, 6, 8, 12, 16, 32)
    steps = [{1: 37, 3: 5}, {1: 4, 8: 2, 40: 1}, {}, {2: 9, 6: 3, 16: 1, 32: 2}]
    ref_registry, registry = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("x_per_token", "doc", buckets=buckets, registry=ref_registry)
    counted = CountedHistogram("x_per_token", "doc", buckets, registry)
    for step in steps:
        for experts, n in step.items():
            counted.observe(experts, n)
            for _ in range(n):
                ref.observe(experts)

    def samples(reg) -> dict:
        fams = families(generate_latest(reg).decode())
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fams["x_per_token"].samples
                if not s.name.endswith("_created")}

    assert samples(registry) == samples(ref_registry) and samples(registry)[("x_per_token_count", ())] == 64


def test_the_server_process_adds_the_requests_in_transit_to_the_cores_queue():
    """--engine-process on: the core counts the requests it has queued, the server process those it
    sent that the core has not answered yet; the scrape sums both, for vLLM's gauge and ours."""
    core, front = Metrics(), Metrics()
    core.configure_engine(BASE, 16, 100, max_loras=None)
    core.publish(core._state.__class__(running=2, waiting=3))
    in_transit = [0]
    front.count_in_transit(BASE, lambda: in_transit[0])
    from server.metrics import exposition

    for sent in (0, 4):
        in_transit[0] = sent
        fams = families(exposition(front.registry, list(core.registry.collect())).decode())
        assert value(fams, "vllm:num_requests_waiting", model_name=BASE, engine="0") == 3 + sent
        assert [s.labels for s in fams["vllm:num_requests_waiting"].samples] == [{"model_name": BASE, "engine": "0"}]
        assert value(fams, "loramux_requests_waiting") == 3 + sent
        assert value(fams, "vllm:num_requests_running") == 2


def test_a_stream_of_n_tokens_observes_n_minus_1_inter_token_latencies(server):
    """vLLM observes the inter-token latency once per output token after the first, with that
    token's own interval; loramux observed vllm:time_per_output_token_seconds once per request,
    with the request's mean. Streamed, the observed intervals add up to the stream's span."""
    n = 12
    before = families(metrics_text(server))
    arrivals = []
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=120,
                      headers={"Authorization": "Bearer key-alpha"},
                      json={"model": BASE, "prompt": "count", "max_tokens": n, "ignore_eos": True,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == n
    fams = families(metrics_text(server))
    for family in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        count = value(fams, family, family + "_count") - value(before, family, family + "_count")
        total = value(fams, family, family + "_sum") - value(before, family, family + "_sum")
        assert count == n - 1, family
        # the engine's intervals, measured where the outputs leave it: within the client's span
        assert 0 < total <= arrivals[-1] - arrivals[0] + 0.5, (family, total, arrivals[-1] - arrivals[0])
    per_request = "vllm:request_time_per_output_token_seconds"
    assert value(fams, per_request, per_request + "_count") - value(before, per_request, per_request + "_count") == 1


def test_inter_token_latencies_share_a_multi_token_outputs_interval():
    """An output carrying several tokens (one step's, for one request) shares the interval since
    the request's previous output evenly among them; its first output observes nothing; a finished
    or forgotten request leaves no state behind."""
    from server.engine.output_processor import RequestOutput

    m = Metrics()
    m.configure_engine(BASE, 16, 100, max_loras=None)
    m.on_outputs([RequestOutput("a", [1]), RequestOutput("b", [1, 2])], now=10.0)
    m.on_outputs([RequestOutput("a", [2, 3, 4])], now=10.75)
    m.on_outputs([RequestOutput("a", [5, 6], finished=True), RequestOutput("b", [])], now=11.25)
    fams = families(generate_latest(m.registry).decode())
    for family in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert value(fams, family, family + "_count", model_name=BASE, engine="0") == 5
        assert value(fams, family, family + "_sum") == 1.25
        assert value(fams, family, family + "_bucket", le="0.2") == 0
        assert value(fams, family, family + "_bucket", le="0.3") == 5
    m.forget_request("b")
    assert m._last_token == {}


def test_in_process_streams_observe_inter_token_latencies(engine):
    """--engine-process off: the engine thread stamps each step, the event loop observes (N - 1
    per stream of N tokens), and an aborted stream leaves no state behind."""
    eng = engine
    client = AsyncEngine(eng)
    itl = eng.metrics.vllm.inter_token_latency

    def count() -> float:
        (family,) = itl.collect()
        return next(s.value for s in family.samples if s.name.endswith("_count"))

    async def run() -> None:
        stream = await client.submit(GenerationRequest("s", [5, 6, 7], SamplingParams(max_tokens=9,
                                                                                      ignore_eos=True)))
        tokens = [t async for out in stream for t in out.token_ids]
        assert len(tokens) == 9 and count() - before == 8
        cut = await client.submit(GenerationRequest("cut", [5, 6, 7], SamplingParams(max_tokens=400,
                                                                                     ignore_eos=True)))
        await anext(cut)
        await anext(cut)
        await cut.aclose()
        for _ in range(100):  # the forget is posted by the engine thread once it has taken the abort
            if "cut" not in eng.metrics._last_token:
                break
            await asyncio.sleep(0.02)

    before = count()
    client.start()
    try:
        asyncio.run(run())
    finally:
        client.shutdown()
    assert count() - before > 8 and eng.metrics._last_token == {}  # and the aborted stream's
