"""loadtest/gpu_check.py, the prepared GPU check, on CPU: its --smoke mode runs the whole control
flow (tests through pytest, engine decode, transformers and PEFT mixed-adapter baselines, the
floor, the token-count checks, the tables) with a tiny model, so the script a GPU holder runs
once is known to work before that one run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest import gpu_bench as gb  # noqa: E402
from loadtest.gpu_check import FAULT_ENV, SMOKE_PLAN, Budget  # noqa: E402
from loadtest.gpu_systems import Unit, units  # noqa: E402
from server.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from server.model.random_weights import random_weights  # noqa: E402


def run_script(out: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "loadtest/gpu_check.py", "--smoke", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def expected_rows() -> set[tuple[str, int, int]]:
    p = SMOKE_PLAN
    rows = {("loramux", a, s) for a in (0, *p.adapter_counts) for s in p.streams}
    rows |= {(system, 0, s) for system in ("loramux --no-lora", "transformers") for s in p.streams}
    rows |= {("peft", a, s) for a in p.adapter_counts for s in p.streams}
    B, A = p.target_streams, p.adapter_counts[0]
    rows |= {("loramux --enforce-eager", 0, 1), ("loramux --enforce-eager", 0, B), ("loramux --enforce-eager", A, B)}
    rows |= {("loramux --async-scheduling", a, s) for a, s in [(0, 1), (A, B), (0, B), (0, p.streams[-1]),
                                                                (A, p.streams[-1])]}
    return rows


def test_smoke_run_writes_every_table(tmp_path):
    proc = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()

    B, A = SMOKE_PLAN.target_streams, SMOKE_PLAN.adapter_counts[0]
    tests = res["tests"]
    assert tests["exit"] == 0 and tests["failed"] == tests["errors"] == 0
    # tests/test_gpu_engine.py: 16 tests, skipped without CUDA (with it 3 skip; the KV-cache sizing
    # test, the 16th, was added without a GPU run)
    assert tests["passed"] + tests["skipped"] == 16, tests
    assert (tmp_path / tests["log"]).is_file()

    rows = {(r["system"], r["adapters"], r["streams"]): r for r in res["rows"]}
    assert set(rows) == expected_rows() and len(res["rows"]) == len(rows)
    for key, r in rows.items():
        assert r["status"] == "ok" and r["tokens_ok"] is True, (key, r)
        assert r["tok_s"] > 0 and r["floor_tok_s"] > 0, (key, r)
        streams_bytes = r["step_bytes"]
        assert streams_bytes["weights"] > 0 and streams_bytes["kv"] > 0
        assert (streams_bytes["adapters"] > 0) == (r["adapters"] > 0), (key, r)
        assert re.search(rf"^\| {re.escape(key[0])} \| {key[1] or 'base'} \| {key[2]} \| [0-9.]+ \| [0-9.]+ \|",
                         md, re.M), key
    assert res["floor"]["copy_bytes_per_s"] > 0
    assert {"random weights on the device", "engine, LoRA enabled", "engine, --no-lora",
            "engine, LoRA enabled, --enforce-eager"} <= set(res["setup"])
    # the graphs-vs-eager and async-vs-sync tables: one line per eager or async row, with both rates
    for title in ("## CUDA graphs", "## Async scheduling"):
        table = md.split(title, 1)[1].split("\n## ", 1)[0]
        for a, s in [(0, 1), (A, B), (0, B)]:
            assert re.search(rf"^\| {a or 'base'} \| {s} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$", table, re.M), \
                (title, a, s)

    assert len(res["targets"]) == 5
    for t in res["targets"]:
        assert isinstance(t["value"], float) and t["value"] > 0, t
        assert f"| {t['name']} |" in md
    assert [m["name"] for m in res["micro"]] == ["attention", "pages", "kernels"]
    assert all(m["status"].startswith("skipped") for m in res["micro"]) != torch.cuda.is_available()
    many = res["many_adapters"]["rows"]  # tests/test_gpu_many_adapters.py checks the section itself
    assert [r["status"] for r in many] == ["ok", "ok"] and all(r["tokens_ok"] for r in many)
    assert "## Many adapters (issue 11)" in md


def test_a_spent_budget_skips_the_rows_and_still_writes_the_tables(tmp_path):
    proc = run_script(tmp_path, "--budget-s", "0", "--skip-tests")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {(r["system"], r["adapters"], r["streams"]) for r in res["rows"]} == expected_rows()
    assert all(r["status"] == "skipped: run budget spent" and r["tok_s"] is None for r in res["rows"])
    assert all(t["value"] is None and t["met"] is None for t in res["targets"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("skipped: run budget spent") == len(expected_rows())
    assert [r["status"] for r in res["many_adapters"]["rows"]] == ["skipped: deadline passed"] * 2
    assert "not measured" in md and "tests skipped (--skip-tests)" in md


def test_a_hung_section_is_killed_past_its_cap_and_the_next_one_still_runs(tmp_path):
    """The decode benchmark's process hangs (as a deadlocked kernel would): it is killed grace_s
    past its cap, every row it owed says so, the many-adapters section still runs in its own
    process, the tables are written, and the exit status says the check is incomplete."""
    proc = run_script(tmp_path, "--skip-tests", "--cap", "bench=1", "--grace-s", "2", fault="hang:bench")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {(r["system"], r["adapters"], r["streams"]) for r in res["rows"]} == expected_rows()
    assert all(r["status"].startswith("not run: killed 2 s past its cap") for r in res["rows"]), res["rows"]
    assert [r["status"] for r in res["many_adapters"]["rows"]] == ["ok", "ok"]
    assert any(n.startswith("decode benchmark: killed") for n in res["notes"]), res["notes"]
    assert "not run: killed" in (tmp_path / "gpu_check.md").read_text()
    assert (tmp_path / "section_bench.log").is_file()


def test_a_crashed_section_leaves_the_tables_of_the_others(tmp_path):
    """The many-adapters process dies (a crash in a CUDA library): its rows say so, the tables
    still hold the rest (here the benchmark's rows, skipped by a zero cap, in-process)."""
    proc = run_script(tmp_path, "--skip-tests", "--cap", "bench=0", fault="exit:many")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(r["status"] == "skipped: time cap" for r in res["rows"]) and len(res["rows"]) == len(expected_rows())
    many = res["many_adapters"]["rows"]
    assert [r["status"] for r in many] == ["not run: its process exited with status 3"] * 2, many
    assert any(n.startswith("many-adapters section: its process exited with status 3") for n in res["notes"])
    assert "## Many adapters (issue 11)" in (tmp_path / "gpu_check.md").read_text()


def test_target_rows_come_first_and_every_row_once():
    order = units(SMOKE_PLAN)
    assert len(order) == len(set(order)) == len(expected_rows())
    B, A = SMOKE_PLAN.target_streams, SMOKE_PLAN.adapter_counts[0]
    first = {Unit("loramux", 0, 1), Unit("loramux --no-lora", 0, 1), Unit("loramux", A, B),
             Unit("loramux", 0, B), Unit("loramux --no-lora", 0, B), Unit("peft", A, B)}
    assert first <= set(order[:len(first) + 2])


def test_section_deadline_is_its_cap_or_the_run_end():
    now = [100.0]
    budget = Budget(50, clock=lambda: now[0])
    assert budget.section(10) == 110 and budget.section(80) == 150
    now[0] = 160.0
    assert budget.left() == -10 and budget.section(10) == 150


@pytest.mark.parametrize("hf_config", [gb.TINY, {**gb.TINY, "rope_theta": 500000.0, "rope_scaling": dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)}],
    ids=["default-rope", "llama3-rope"])
def test_transformers_over_the_engine_weights_decodes_like_the_engine(tmp_path, hf_config):
    """The baselines run the engine's own random weights: transformers' model built over them
    (views of the fused matrices) gives the engine's greedy tokens."""
    model_dir = gb.write_model_dir(tmp_path / "m", hf_config)
    from server.model.arch import ModelArch

    weights = random_weights(ModelArch.from_dir(model_dir), torch.float32, torch.device("cpu"), seed=3, std=0.08)
    engine = gb.make_engine(model_dir, weights, lora=False, adapters={}, max_seqs=2, max_len=64, device="cpu",
                            dtype="float32")
    prompt = gb.random_prompts(1, 9, hf_config["vocab_size"], seed=5)[0]
    engine.add_request(GenerationRequest("r", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
    got = []
    while engine.has_unfinished():
        got += [t for o in engine.step() for t in o.token_ids]
    hf = gb.hf_model_over(weights, hf_config)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref
