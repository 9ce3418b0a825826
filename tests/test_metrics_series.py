"""Metric series over their life: a tenant or adapter gets series when it first serves, keeps them
within --adapter-metric-series, and loses them when it is removed or unloaded, never brought back
by its last requests; `vllm:lora_requests_info` names an adapter as its clients call it."""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from peft_adapters import make_peft_adapter
from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams
from server.metrics import OTHER_ADAPTERS, Metrics
from test_metrics import BASE, QV, families, scrape


def test_a_tenant_removed_from_the_configuration_loses_its_series():
    m = Metrics()
    m.set_tenants(["alpha", "beta"])
    m.on_finish("alpha", "", "stop", 3, 0.5, 0.1)
    m.on_first_token("beta", "x", 3, 0.2)
    m.set_tenants(["beta", "gamma"])
    tenants = {s.labels.get("tenant") for f in text_string_to_metric_families(generate_latest(m.registry).decode())
               for s in f.samples} - {None}
    assert tenants == {"beta", "gamma"}


def test_adapters_past_the_series_limit_share_one_label_and_an_unload_frees_a_place():
    m = Metrics()
    m.configure_engine(BASE, 16, 100, max_loras=8, adapter_series=2)
    for adapter in ("a", "b", "c", "", "d", "a"):
        m.on_first_token("alpha", adapter, 3, 0.2)
        m.on_finish("alpha", adapter, "stop", 3, 0.5, 0.1)

    def requests_by_adapter() -> dict[str, float]:
        fams = families(generate_latest(m.registry).decode())
        return {s.labels["adapter"]: s.value for s in fams["loramux_requests"].samples
                if s.name == "loramux_requests_total"}

    assert requests_by_adapter() == {"a": 2, "b": 1, OTHER_ADAPTERS: 2, "": 1}  # the base is never "other"
    ttft = families(generate_latest(m.registry).decode())["loramux_time_to_first_token_seconds"]
    assert {s.labels["adapter"] for s in ttft.samples} == {"a", "b", OTHER_ADAPTERS, ""}
    m.forget_adapter("b")
    m.forget_adapter("c")  # never had series of its own: "other" keeps its count
    m.on_finish("alpha", "e", "length", 3, 0.5, None)
    assert requests_by_adapter() == {"a": 2, "e": 1, OTHER_ADAPTERS: 2, "": 1}


def test_the_adapter_series_limit_is_a_flag():
    from server.cli import build_config, make_parser

    cfg = build_config(make_parser().parse_args(["serve", "--adapter-metric-series", "7"]))
    assert cfg.lora.adapter_metric_series == 7 and Config().lora.adapter_metric_series == 100


def test_an_adapter_unloaded_while_its_request_runs_keeps_no_series(tiny_llama_dir, tmp_path):
    """The last request of an unloaded adapter retires it (its series are forgotten, its place
    among --adapter-metric-series freed); counting that request must not bring them back: else
    every adapter unloaded mid-request keeps ~80 series and a place for good, and after
    --adapter-metric-series of them every new adapter is counted as "(other)"."""
    adapter = make_peft_adapter(tiny_llama_dir, tmp_path / "brief", **QV)
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.model.num_threads = "float32", "cpu", 1
    cfg.model.served_model_name = BASE
    cfg.cache.kv_cache_memory = 8 << 20
    cfg.lora.adapters_dir, cfg.lora.lora_modules = None, {"brief": str(adapter)}
    eng = LLMEngine(cfg, tiny_llama_dir)
    eng.add_request(GenerationRequest("b1", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True),
                                      adapter="brief"))
    deadline = time.monotonic() + 60
    while not eng.scheduler.num_running:  # its adapter loads on the loader thread
        assert time.monotonic() < deadline, "the request was not scheduled within 60 s"
        eng.step()
        time.sleep(0.01)
    eng.adapters.unregister(None, "brief")
    while eng.has_unfinished():
        eng.step()
    labelled = {s.labels.get("adapter") for f in scrape(eng).values() for s in f.samples} - {None}
    assert "brief" not in labelled, "the retired adapter's series came back"


def test_lora_info_names_a_tenants_adapter_as_its_clients_call_it(tiny_llama_dir, tmp_path):
    """A tenant calls its own adapter by its name (`model: "mine"`), and the endpoint picker
    matches a request's model against `running_lora_adapters`: the label holds "mine", not the
    "acme/mine" of loramux's own per-adapter series (before: "acme/mine", no affinity)."""
    from engine_runs import cpu_engine

    path = make_peft_adapter(tiny_llama_dir, tmp_path / "mine", seed=3, r=8, lora_alpha=16,
                             target_modules=["q_proj", "v_proj"])
    eng = cpu_engine(tiny_llama_dir, {}, adapter_roots=(tmp_path,))
    ref = eng.adapters.load_path("acme", "mine", str(path)).ref
    assert str(ref) == "acme/mine"
    eng.add_request(GenerationRequest("r", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True),
                                      adapter=ref, tenant="acme"))
    seen = set()
    while eng.has_unfinished():
        eng.step()
        (sample,) = [s for m in eng.metrics.vllm.lora_requests_info.collect() for s in m.samples]
        seen.add(sample.labels["running_lora_adapters"])
    assert seen - {""} == {"mine"}, seen


def test_a_removed_tenants_last_requests_do_not_bring_its_series_back():
    """A reload removes tenant "gone" while its request runs; that request then ends: no series
    of "gone" may come back (before: every tenant series it touched reappeared, for good)."""
    m = Metrics()
    m.set_tenants(["kept", "gone"])
    m.set_tenants(["kept"])
    m.on_scheduled("gone", 0.1)
    m.on_first_token("gone", "", 5, 0.2)
    m.on_generated({"gone": 3, "kept": 1})
    m.on_experts_request("gone", mixture=True)
    m.on_finish("gone", "", "stop", 5, 1.0, 0.01)
    text = generate_latest(m.registry).decode()
    assert 'tenant="gone"' not in text
    assert 'loramux_tenant_generation_tokens_total{tenant="kept"} 1.0' in text
    assert "loramux_generation_tokens_total 4.0" in text
