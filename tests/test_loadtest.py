"""loadtest/: the workload is reproducible and shaped as asked, the runner refuses
non-local targets, and a short real run against a tiny-model server succeeds end to end
with numbers that agree with the server's own counters."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # loadtest/ is a directory of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from server_process import ServerProcess  # noqa: E402

from loadtest import report, workload  # noqa: E402
from loadtest.run import NotLocalError, check_local_url  # noqa: E402


def test_workload_is_reproducible_and_shaped_as_configured(tmp_path):
    cfg = workload.WorkloadConfig(num_requests=4000, rate=20.0, adapters=("a", "b", "c", "d"), zipf_s=1.0,
                                  base_share=0.25, stream_share=0.5,
                                  prompt_len=workload.LengthDist.parse("uniform:5:50"),
                                  output_len=workload.LengthDist.parse("lognormal:32:0.5:100"), seed=7)
    specs = workload.generate(cfg)
    assert specs == workload.generate(cfg)
    assert specs != workload.generate(workload.WorkloadConfig(**{**vars(cfg), "seed": 8}))

    mix = Counter(s.adapter for s in specs)
    assert abs(mix[None] / len(specs) - 0.25) < 0.03
    assert mix["a"] > mix["b"] > mix["c"] > mix["d"] > 0  # Zipf: popularity falls with rank
    assert abs(mix["a"] / mix["b"] - 2.0) < 0.4  # s = 1: rank 0 twice as popular as rank 1
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(specs[:-1], specs[1:], strict=True)]
    assert min(gaps) >= 0 and abs(sum(gaps) / len(gaps) - 1 / 20.0) < 0.005  # Poisson at 20/s
    assert all(5 <= s.prompt_words <= 50 and 1 <= s.max_tokens <= 100 for s in specs)
    assert abs(sum(s.stream for s in specs) / len(specs) - 0.5) < 0.03
    assert len({s.prompt for s in specs}) == len(specs)

    path = tmp_path / "w.jsonl"
    workload.save(specs, path)
    assert workload.load(path) == specs
    assert all(s.arrival_s == 0 for s in workload.generate(workload.WorkloadConfig(num_requests=5)))
    with pytest.raises(ValueError):
        workload.generate(workload.WorkloadConfig(num_requests=workload.MAX_REQUESTS + 1))


def test_workload_disconnects_only_streams_and_leaves_the_rest_of_the_workload_alone():
    base = workload.WorkloadConfig(num_requests=2000, stream_share=0.5, adapters=("a", "b"), seed=5)
    plain = workload.generate(base)
    hang = workload.generate(workload.WorkloadConfig(**{**vars(base), "disconnect_share": 0.3,
                                                        "disconnect_after": workload.LengthDist.parse("uniform:2:5")}))
    assert all(s.disconnect_after is None for s in plain)
    leavers = [s for s in hang if s.disconnect_after is not None]
    assert abs(len(leavers) / len(hang) - 0.3) < 0.03
    assert all(s.stream and 2 <= s.disconnect_after <= 5 for s in leavers)
    assert {s.disconnect_after for s in leavers} == {2, 3, 4, 5}
    # Arrivals, prompts, lengths and adapters are drawn from their own streams: unchanged.
    strip = lambda s: (s.arrival_s, s.adapter, s.prompt, s.max_tokens)  # noqa: E731
    assert list(map(strip, plain)) == list(map(strip, hang))
    assert all(p.stream == h.stream for p, h in zip(plain, hang, strict=True) if h.disconnect_after is None)
    with pytest.raises(ValueError):
        workload.generate(workload.WorkloadConfig(disconnect_share=1.5))


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://192.168.1.5", "http://8.8.8.8:80",
                                 "http://example.com:8000", "http://[::2]:8000", "ftp://127.0.0.1:21",
                                 "http://127.0.0.1.nip.io:8000"])
def test_runner_refuses_targets_off_this_machine(url):
    with pytest.raises(NotLocalError):
        check_local_url(url)


def test_runner_accepts_loopback_targets():
    assert check_local_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000"
    assert check_local_url("http://127.3.4.5:9") == "http://127.3.4.5:9"
    assert check_local_url("http://[::1]:8000") == "http://[::1]:8000"
    assert check_local_url("http://localhost:8000") == "http://localhost:8000"


def test_percentiles_interpolate_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert report.percentile(xs, 0.5) == 3.0
    assert report.percentile(xs, 0.95) == pytest.approx(8.8)
    assert report.percentile([5.0], 0.99) == 5.0
    assert report.percentile([], 0.5) is None


def write_lora_adapter(out: Path, base_dir: Path, seed: int, rank: int = 4) -> None:
    """A random q/v LoRA adapter in the PEFT on-disk format, written directly: importing peft
    to make one costs seconds (tests/test_adapter_format.py covers PEFT itself)."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base_dir / "config.json").read_text())
    hidden, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    outs = {"q_proj": hidden, "v_proj": hidden // heads * kv_heads}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, out_features in outs.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.3
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(outs), "bias": "none",
        "task_type": "CAUSAL_LM"}))


def test_short_run_against_a_real_server(tiny_llama_dir, tmp_path):
    """~5 s of Poisson traffic over the base model and four adapters (more than the two device
    slots, so adapters are swapped in and out), streaming and not."""
    store = tmp_path / "adapters"
    for k in range(4):
        write_lora_adapter(store / f"expert-{k}", tiny_llama_dir, seed=k)
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", str(store),
                         "--max-loras", "2", "--max-lora-rank", "8"], tmp_path / "server.log")
    flags = ["-n", "30", "--rate", "6", "--prompt-len", "uniform:4:24", "--output-len", "uniform:4:16",
             "--stream-share", "0.8", "--base-share", "0.25", "--zipf", "1.0", "--seed", "3"]
    out = tmp_path / "results.json"
    try:
        # --adapters defaults to "auto": the four adapters the server lists, in /v1/models order.
        proc = subprocess.run([sys.executable, "-m", "loadtest.run", "--url", srv.base_url, *flags, "--duration", "15",
                               "--drain", "10", "--timeout", "20", "--out", str(out), "--fail-on-error"],
                              cwd=ROOT, capture_output=True, text=True, timeout=400)
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr + srv.log()
    data = json.loads(out.read_text())
    s = report.summarize(data)
    assert (s["sent"], s["ok"], s["errors"], s["cancelled"]) == (30, 30, 0, 0), s["error_kinds"]
    assert s["request_throughput"] > 0 and s["output_token_throughput"] > 0
    assert 0 < s["ttft"]["p50"] <= s["ttft"]["p99"] <= s["e2e"]["max"]
    assert s["e2e"]["p50"] <= s["e2e"]["p95"] <= s["e2e"]["p99"] <= s["e2e"]["max"]
    assert s["tpot"]["count"] > 0 and s["tpot"]["mean"] > 0
    assert s["ttft"]["count"] == sum(r["stream"] for r in data["results"]) > 0

    # The client's view agrees with the workload and with the server's counters.
    parser = argparse.ArgumentParser()
    workload.add_arguments(parser)
    adapters = tuple(f"expert-{k}" for k in range(4))
    specs = workload.generate(workload.config_from_args(parser.parse_args(flags), adapters))
    by_index = {sp.index: sp for sp in specs}
    assert len({sp.adapter for sp in specs}) >= 3  # the base and at least two adapters were exercised
    assert set(s["adapters"]) == {sp.adapter or "<base>" for sp in specs}
    for r in data["results"]:
        assert r["adapter"] == by_index[r["index"]].adapter
        assert r["completion_tokens"] == by_index[r["index"]].max_tokens  # ignore_eos: exact lengths
        assert r["prompt_tokens"] > 0
        if r["stream"]:
            assert 0 < r["ttft_s"] <= r["e2e_s"]
            assert math.isclose(r["ttft_s"] + sum(r["itl_s"]), r["e2e_s"], rel_tol=0.2, abs_tol=0.1)
    server = data["server"]
    assert server["loramux_requests_total"] == 30
    assert server["loramux_generation_tokens_total"] == s["completion_tokens"]
    assert server["loramux_prompt_tokens_total"] == s["prompt_tokens"]


def test_workload_splits_traffic_over_tenants_by_weight_and_leaves_the_rest_alone():
    base = workload.WorkloadConfig(num_requests=3000, adapters=("a", "b"), seed=2)
    plain = workload.generate(base)
    split = workload.generate(workload.WorkloadConfig(**{**vars(base), "tenants": (("big", 3.0), ("small", 1.0))}))
    assert all(s.tenant is None for s in plain)
    mix = Counter(s.tenant for s in split)
    assert set(mix) == {"big", "small"} and abs(mix["big"] / len(split) - 0.75) < 0.03
    strip = lambda s: (s.arrival_s, s.adapter, s.prompt, s.max_tokens, s.stream)  # noqa: E731
    assert list(map(strip, plain)) == list(map(strip, split))
    arg = workload.TenantArg.parse("acme=lmx-k_1:2.5")
    assert (arg.name, arg.key, arg.weight) == ("acme", "lmx-k_1", 2.5)
    for bad in ("=k", "acme=k:0", "acme=k:-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            workload.TenantArg.parse(bad)


def test_per_tenant_run_reports_latency_and_429s(tiny_llama_dir, tmp_path):
    """Two tenants with keys against a server with a tenants file: `small` may send 4 requests a
    minute, `big` is unlimited. The per-tenant report agrees with the server's counters."""
    from server.tenants import hash_key

    keys = {"big": "lmx-big-key", "small": "lmx-small-key"}
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.big]\nkeys = ["{hash_key(keys["big"])}"]\n\n'
                       f'[tenants.small]\nkeys = ["{hash_key(keys["small"])}"]\nrequests_per_minute = 4\n')
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--tenants", str(tenants)],
                        tmp_path / "server.log")
    out = tmp_path / "results.json"
    flags = ["-n", "24", "--rate", "8", "--prompt-len", "uniform:4:12", "--output-len", "fixed:8", "--seed", "1",
             "--tenant", f"big={keys['big']}:1", "--tenant", f"small={keys['small']}:1"]
    try:
        proc = subprocess.run([sys.executable, "-m", "loadtest.run", "--url", srv.base_url, *flags, "--adapters", "",
                               "--duration", "15", "--drain", "10", "--timeout", "20", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr + srv.log()
    assert "tenant" in proc.stdout and "429" in proc.stdout
    data = json.loads(out.read_text())
    s = report.summarize(data)
    sent = Counter(r["tenant"] for r in data["results"])
    big, small = s["tenants"]["big"], s["tenants"]["small"]
    assert (big["requests"], small["requests"]) == (sent["big"], sent["small"]) and sent["small"] > 4
    assert (big["ok"], big["rate_limited"], big["errors"]) == (sent["big"], 0, 0)
    # A full bucket of 4, refilled at 4/min: over a ~3 s run no fifth request fits.
    assert (small["ok"], small["rate_limited"], small["errors"]) == (4, sent["small"] - 4, 0)
    assert all(r["retry_after_s"] >= 1 for r in data["results"] if r["status"] == 429)
    assert big["e2e"]["count"] == sent["big"] and big["output_token_throughput"] > 0
    assert data["server"]["loramux_tenant_requests_total{status=rate_limited,tenant=small}"] == sent["small"] - 4


def test_many_adapters_scenario_reports_latency_and_cache_counters(tiny_llama_dir, tmp_path):
    """The many-adapters scenario, shrunk: 6 random adapters through a 2-adapter host cache,
    16 requests; every request is served and the cache counters agree with the workload."""
    from loadtest import many_adapters

    sc = many_adapters.Scenario(tiny_llama_dir, counts=[6], zipf=[1.0], streams=4, requests=16, prompt_len="fixed:4",
                                max_tokens=4, rank=8, distinct=3,
                                server_args=["--max-cpu-loras", "2", "--max-loras", "2", "--dtype", "float32",
                                             "--kv-cache-memory", "8MiB"])
    (row,) = many_adapters.run_scenario(sc, tmp_path)
    assert (row["adapters"], row["zipf"], row["requests"], row["ok"], row["errors"]) == (6, 1.0, 16, 16, 0)
    assert row["short"] == 0  # every request returned its max_tokens
    assert row["cache_hits"] + row["cache_misses"] == 16  # one host-cache lookup per request
    assert row["distinct_used"] <= row["loads"] <= 16  # each adapter used loads at least once
    assert 0 <= row["hit_rate"] < 1 and row["loads_per_s"] > 0
    assert row["output_tok_s"] > 0 and 0 < row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert 0 < row["tpot_p50_s"] <= row["tpot_p99_s"]
    import xml.dom.minidom

    svg = xml.dom.minidom.parseString(many_adapters.plot([row, {**row, "adapters": 60, "zipf": 1.0}]))
    assert len(svg.getElementsByTagName("polyline")) == 3  # tok/s, TTFT, hit rate: one Zipf line each


def test_step_overhead_splits_decode_steps_and_counts_every_token(capsys):
    """The host-overhead benchmark, shrunk: a row per (rows, streams), each part of a step timed
    (none negative or missing: the timers nest as the docstring says), every token back."""
    from loadtest import bench_step_overhead

    assert bench_step_overhead.main(["--streams", "1", "3", "--tokens", "4", "--repeats", "1",
                                     "--adapters", "2"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("base", "2 lora"))]
    assert [(r[0].split()[0], int(r[0].split()[-1])) for r in rows] == [("base", 1), ("base", 3), ("2", 1), ("2", 3)]
    for r in rows:
        assert all(float(x) > 0 for x in r[1].split()), r


def test_many_adapters_ratios_are_against_the_smallest_count_of_each_zipf():
    """The scenario's baseline is its own smallest adapter count, per Zipf exponent, in the same run."""
    from loadtest import many_adapters

    def row(n, s, tps, ttft):
        return {"adapters": n, "zipf": s, "output_tok_s": tps, "ttft_p50_s": ttft}

    lines = many_adapters.ratio_lines([row(1000, 1.0, 80.0, 0.3), row(8, 1.0, 100.0, 0.2), row(8, 0.5, 50.0, 0.1),
                                       row(64, 0.5, 25.0, 0.4)])
    assert lines == ["zipf 0.5: 64 vs 8 adapters: throughput 0.50x, TTFT p50 4.00x",
                     "zipf 1.0: 1000 vs 8 adapters: throughput 0.80x, TTFT p50 1.50x"]
