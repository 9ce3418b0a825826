"""loadtest/gpu_many_adapters.py, issue 11's many-adapters scenario for the GPU check, on CPU: its
--smoke mode runs the GPU mode's code path (random weights made in-process, a store of hard-linked
adapters, a fresh engine per cell, the closed loop, the Metrics counters, the tables) with a tiny
model, so the one GPU run is known to work before it happens."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from loadtest import closed_loop, gpu_bench as gb, gpu_many_adapters as gma, workload
from server.model.arch import ModelArch
from server.model.random_weights import random_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_smoke_run_serves_every_token_of_both_cells_and_writes_the_tables(tmp_path):
    assert gma.main(["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_many_adapters.json").read_text())
    md = (tmp_path / "gpu_many_adapters.md").read_text()
    plan = gma.SMOKE
    few, many = res["rows"]
    assert [(r["adapters"], r["zipf"]) for r in res["rows"]] == [(c.adapters, c.zipf) for c in plan.cells]
    for r in (few, many):
        assert r["status"] == "ok" and r["tokens_ok"] is True and r["complete"] is True, r
        assert r["requests"] == r["of"] == plan.requests and r["short_requests"] == 0
        assert r["tokens"] == plan.requests * plan.new_tokens  # every request its tokens
        assert r["cache_hits"] + r["cache_misses"] == plan.requests  # one host-cache lookup per request
        assert 1 <= r["step_adapters_mean"] <= r["step_adapters_max"] <= min(plan.streams, r["distinct_used"])
        assert r["output_tok_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert 0 < r["tpot_p50_s"] <= r["tpot_p99_s"]
        assert re.search(rf"^\| {r['adapters']} \| {r['zipf']:g} \| [0-9.]+ \| \d+ / \d+ \| \d+ / \d+ \| [0-9.]+ \| "
                         rf"[0-9.]+ \| [0-9.]+ / \d+ \| {plan.requests}/{plan.requests} \| exact \|", md, re.M), r
    # The many-adapter cell: more adapters used than the host cache holds, so loads evict and miss.
    cache = plan.lora_flags["max_cpu_loras"]
    assert many["distinct_used"] > cache and many["loads"] >= many["distinct_used"] and many["evictions"] > 0
    assert many["hit_rate"] < 1 and many["loads_per_s"] > 0
    assert few["distinct_used"] == few["adapters"]  # uniform over the baseline's adapters
    assert [t["target"] for t in res["ratios"]] == [">= 0.8", "<= 2"]
    for t in res["ratios"]:
        assert isinstance(t["value"], float) and t["value"] > 0 and t["met"] in (True, False), t
        assert f"| {t['name']} | {t['target']} | {t['value']:.2f} |" in md
    assert {k.split(" (")[0] for k in res["setup"]} == {"model directory", "random weights on the device",
                                                        "adapter stores"}


def test_a_spent_budget_skips_every_cell_and_still_writes_the_tables(tmp_path):
    assert gma.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    res = json.loads((tmp_path / "gpu_many_adapters.json").read_text())
    assert [r["status"] for r in res["rows"]] == ["skipped: deadline passed"] * len(gma.SMOKE.cells)
    assert res["setup"] == {}  # nothing was made for rows that do not run
    assert all(t["value"] is None and t["met"] is None for t in res["ratios"])
    md = (tmp_path / "gpu_many_adapters.md").read_text()
    assert md.count("skipped: deadline passed") == len(gma.SMOKE.cells) and "not measured" in md


def test_the_closed_loop_aborts_what_is_in_flight_at_its_deadline(tmp_path):
    """A row cut at the deadline says so and frees the engine (nothing left unfinished)."""
    plan = gma.SMOKE
    model_dir = gb.write_model_dir(tmp_path / "model", plan.hf_config)
    weights = random_weights(ModelArch.from_dir(model_dir), torch.float32, torch.device("cpu"))
    stores = gma.make_stores(plan, model_dir, tmp_path)
    engine = gma.make_engine(plan, model_dir, weights, stores[plan.cells[0].adapters])
    jobs = gma.jobs_for(plan, plan.cells[0], ["lora-00000", "lora-00001"])
    got = closed_loop.run(engine, jobs, plan.streams, "cut", deadline=time.monotonic())
    assert (got["complete"], got["requests"], got["submitted"], got["of"]) == (False, 0, plan.streams, plan.requests)
    assert not engine.has_unfinished()
    # The same engine then runs the stream to the end, every request with its tokens.
    full = closed_loop.run(engine, jobs[:6], plan.streams, "full")
    assert full["complete"] and full["tokens_ok"] and full["tokens"] == 6 * plan.new_tokens
    assert all(isinstance(j.spec, workload.RequestSpec) and len(j.prompt_ids) == plan.prompt_len for j in jobs)
