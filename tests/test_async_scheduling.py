"""Async scheduling (`--async-scheduling`, server/engine/engine.py): step N+1 is scheduled and
launched before the host takes in step N's tokens, and a decode of a token still pending reads it
on the device from step N's output. The tokens equal PEFT's and transformers' greedy ones, and the
synchronous engine's where sampling is seeded (logprobs, penalties, stop tokens), through chunked
prefill, admissions as others finish, preemption, aborts and a failing request. On CPU the steps
run one after another; what the overlap gains is the GPU check's to measure (loadtest/gpu_check.py).
The CUDA-graph path is tested in test_cuda_graphs.py (Triton interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams

from engine_runs import cpu_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADAPTERS = {
    "a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]),
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    from peft_adapters import make_peft_adapter

    root = tmp_path_factory.mktemp("async-adapters")
    return {n: make_peft_adapter(tiny_llama_dir, root / n, seed=20 + i, std=0.2, **kw)
            for i, (n, kw) in enumerate(ADAPTERS.items())}


def make(model_dir: Path, async_scheduling: bool, adapters: dict[str, Path] | None = None,
         kv_bytes: int = 8 << 20, max_num_seqs: int = 4) -> LLMEngine:
    return cpu_engine(model_dir, adapters, kv_bytes=kv_bytes, max_num_seqs=max_num_seqs,
                      async_scheduling=async_scheduling)


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish: str | None = None
    error: str | None = None


def run(engine: LLMEngine, requests: list[GenerationRequest], abort_at: dict[str, int] | None = None,
        ) -> dict[str, Result]:
    """Submit all, step until done; abort request `r` before step `abort_at[r]`."""
    for r in requests:
        engine.add_request(r)
    return collect(engine, [r.request_id for r in requests], abort_at)


def collect(engine: LLMEngine, ids: list[str], abort_at: dict[str, int] | None = None) -> dict[str, Result]:
    """Step until done; each request's outputs. An output after a request's end fails the test."""
    got = {rid: Result() for rid in ids}
    step = 0
    while engine.has_unfinished():
        for rid, at in (abort_at or {}).items():
            if at == step and got[rid].finish is None:
                got[rid].finish = engine.abort(rid).finish_reason.value
        for out in engine.step():
            res = got[out.request_id]
            assert res.finish is None, f"{out.request_id}: an output after its end"
            res.tokens += out.token_ids
            res.logprobs += out.logprobs
            res.error = out.error
            if out.finished:
                res.finish = out.finish_reason.value
        step += 1
    assert engine.allocator.num_used == 0
    return got


def count_computed(engine: LLMEngine) -> list[int]:
    """Tokens each launched step computes (the runner's execute wrapped): one total, in a list."""
    total = [0]
    execute = engine.runner.execute

    def counted(chunks, *args, **kwargs):
        total[0] += sum(c.num_tokens for c in chunks)
        return execute(chunks, *args, **kwargs)
    engine.runner.execute = counted
    return total


def prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in lengths]


def test_greedy_tokens_equal_peft_across_adapters_chunks_and_admissions(tiny_llama_dir, adapter_dirs):
    """Ten requests over the base and two adapters, four at a time (the rest admitted as others
    finish), prompts chunked at 32 tokens, 1 to 19 new tokens: PEFT's greedy tokens and logprobs,
    each run alone. No step computes a token past a request's max_tokens: the async engine
    computes exactly the synchronous engine's tokens."""
    from peft_adapters import peft_greedy

    lengths = (1, 5, 40, 9, 70, 3, 17, 33, 2, 50)
    news = (1, 2, 7, 19, 3, 12, 1, 9, 16, 5)
    names = [None, "a", "b"]
    ps = prompts(lengths, seed=11)
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0),
                              adapter=names[i % 3]) for i, (p, n) in enumerate(zip(ps, news))]
    expected = [peft_greedy(tiny_llama_dir, adapter_dirs[names[i % 3]] if names[i % 3] else None, p, n)
                for i, (p, n) in enumerate(zip(ps, news))]

    computed = {}
    for mode in (True, False):
        engine = make(tiny_llama_dir, mode, adapter_dirs)
        computed[mode] = count_computed(engine)
        got = run(engine, [replace(r) for r in reqs])
        for i, (tokens, logprobs) in enumerate(expected):
            res = got[f"r{i}"]
            assert res.tokens == tokens and res.finish == "length", (mode, i)
            assert [lp.logprob for lp in res.logprobs] == pytest.approx(logprobs, abs=2e-4)
    assert computed[True] == computed[False] == [sum(lengths) + sum(news) - len(news)]


def test_the_first_tokens_come_one_step_later_and_the_last_step_is_taken_in(tiny_llama_dir):
    """Async: the step that launches a prefill returns nothing; its token comes with the next
    step, and the engine has unfinished work until the last launched step is taken in."""
    engine = make(tiny_llama_dir, True)
    engine.add_request(GenerationRequest("r", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0,
                                                                         ignore_eos=True)))
    assert engine.step() == []
    first = engine.step()
    assert [len(o.token_ids) for o in first] == [1] and not first[0].finished
    assert engine.has_unfinished()
    last = engine.step()
    assert [o.finished for o in last] == [True] and not engine.has_unfinished()


def test_seeded_sampling_penalties_and_stop_tokens_equal_the_synchronous_engine(tiny_llama_dir, adapter_dirs):
    """Seeded top-k/top-p sampling with logprobs, a request with penalties (its pending token
    counted on the device) and stop token ids that end some requests early: the async engine
    gives the synchronous engine's tokens, logprobs and finish reasons. The extra step a stopped
    request was already scheduled in gives it nothing."""
    sampled = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=40, logprobs=3, ignore_eos=True)
    params = [replace(sampled, seed=100 + i) for i in range(6)]
    params[2] = replace(params[2], repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2)
    params[4] = replace(params[4], temperature=0.0, seed=None)
    ps = prompts((4, 12, 35, 7, 20, 3), seed=12)
    names = [None, "a", "b"]
    reqs = [GenerationRequest(f"r{i}", p, sp, adapter=names[i % 3]) for i, (p, sp) in enumerate(zip(ps, params))]
    sync_engine = make(tiny_llama_dir, False, adapter_dirs)
    plain = run(sync_engine, [replace(r, request_id=f"plain-{r.request_id}") for r in reqs])
    # stop ids that end r0 and r3 early (a token each sampled mid-way when nothing stops them)
    stops = (plain["plain-r0"].tokens[5], plain["plain-r3"].tokens[8])
    reqs = [replace(r, params=replace(r.params, stop_token_ids=stops)) for r in reqs]

    sync = run(sync_engine, [replace(r) for r in reqs])
    finishes = [(len(sync[f"r{i}"].tokens), sync[f"r{i}"].finish) for i in range(len(reqs))]
    assert any(f == "stop" and n < 24 for n, f in finishes) and any(f == "length" for _, f in finishes), finishes

    got = run(make(tiny_llama_dir, True, adapter_dirs), [replace(r) for r in reqs])
    for rid, want in sync.items():
        res = got[rid]
        assert (res.tokens, res.finish) == (want.tokens, want.finish), rid
        assert [(lp.token_id, [t for t, _ in lp.top]) for lp in res.logprobs] == \
            [(lp.token_id, [t for t, _ in lp.top]) for lp in want.logprobs], rid
        assert [lp.logprob for lp in res.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)


def test_preemption_and_an_abort_in_flight_keep_everyone_elses_tokens(tiny_llama_dir):
    """A KV cache too small for the batch preempts sequences whose token is pending; one request is
    aborted while a step holding it runs. Every other request gets transformers' greedy tokens."""
    from server.engine.model_runner import KVCache
    from test_engine import hf_greedy

    arch_probe = make(tiny_llama_dir, False)
    arch = arch_probe.info.arch
    per_block = KVCache.bytes_per_block(arch.num_layers, arch_probe.info.block_size, arch.num_kv_heads,
                                        arch.head_dim, torch.float32)
    ps = prompts((20, 18, 25, 22, 19, 21), seed=13)
    new = 30
    engine = make(tiny_llama_dir, True, kv_bytes=12 * per_block, max_num_seqs=6)  # 192 of the ~300 tokens
    preempted = []
    schedule = engine.scheduler.schedule

    def counted():
        out = schedule()
        preempted.extend(s for s in out.preempted if s.num_pending)
        return out
    engine.scheduler.schedule = counted
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    got = run(engine, [GenerationRequest(f"r{i}", p, greedy) for i, p in enumerate(ps)], abort_at={"r1": 4})
    assert preempted, "no sequence was preempted with a token pending"
    assert got["r1"].finish == "abort" and len(got["r1"].tokens) < new
    expected = hf_greedy(tiny_llama_dir, ps, new, stop_at_eos=False)
    for i, want in enumerate(expected):
        if i != 1:
            assert got[f"r{i}"].tokens == want and got[f"r{i}"].finish == "length", i


def test_a_failure_in_a_step_fails_only_its_request_with_a_step_in_flight(tiny_llama_dir):
    """A request whose data makes a launch raise (a seed no generator takes) ends with an error;
    the step in flight is taken in first, and the others still get transformers' greedy tokens."""
    from test_engine import hf_greedy

    engine = make(tiny_llama_dir, True)
    ps = prompts((5, 9, 13), seed=14)
    new = 12
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    reqs = [GenerationRequest(f"r{i}", p, greedy) for i, p in enumerate(ps)]
    poison = GenerationRequest("poison", ps[1], SamplingParams(max_tokens=new, temperature=0.8, seed=1))
    for r in (*reqs[:2], poison, reqs[2]):
        engine.add_request(r)
    poison.params = replace(poison.params, seed=2**64)  # past validation, as a bug elsewhere could
    got = collect(engine, ["r0", "r1", "poison", "r2"])
    assert got["poison"].finish == "error" and "ValueError" in got["poison"].error
    expected = hf_greedy(tiny_llama_dir, ps, new, stop_at_eos=False)
    assert [got[f"r{i}"].tokens for i in range(3)] == expected


def test_the_flag_reaches_the_config():
    from server.cli import build_config, make_parser

    assert build_config(make_parser().parse_args(["serve"])).scheduler.async_scheduling is False
    assert build_config(make_parser().parse_args(["serve", "--async-scheduling"])).scheduler.async_scheduling is True


def random_params(rnd, *, max_tokens: int, greedy: float, sampled: float, greedy_logprobs: list,
                  stops: float, stop_ids: int) -> SamplingParams:
    """Random sampling parameters: greedy (share `greedy`) with logprobs from `greedy_logprobs`,
    seeded top-k/top-p (up to `sampled`), else seeded with penalties; a `stops` share with
    `stop_ids` stop token ids."""
    kind, n = rnd.random(), rnd.randint(1, max_tokens)
    if kind < greedy:
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=rnd.choice(greedy_logprobs))
    elif kind < sampled:
        sp = SamplingParams(max_tokens=n, temperature=0.9, top_k=rnd.choice([0, 30]), top_p=rnd.choice([1.0, 0.9]),
                            seed=rnd.randint(0, 1000), ignore_eos=True, logprobs=rnd.choice([None, 3]))
    else:
        sp = SamplingParams(max_tokens=n, temperature=0.8, seed=rnd.randint(0, 1000), repetition_penalty=1.2,
                            frequency_penalty=0.3, ignore_eos=True)
    if rnd.random() < stops:
        sp = replace(sp, stop_token_ids=tuple(rnd.randint(2, 319) for _ in range(stop_ids)))
    return sp


def random_workload(seed: int) -> list[tuple[int, int | None, GenerationRequest]]:
    """(arrival step, abort once it has this many tokens or None, request): greedy with logprobs,
    seeded top-k/top-p, a few with penalties, some with stop ids, over the base and two adapters
    and three tenants."""
    import random

    rnd = random.Random(seed)
    work = []
    for i in range(rnd.randint(6, 12)):
        prompt = [rnd.randint(2, 319) for _ in range(rnd.choice([1, 2, 5, 9, 20, 33, 45, 60]))]
        sp = random_params(rnd, max_tokens=20, greedy=0.4, sampled=0.95, greedy_logprobs=[None, 0, 2],
                           stops=0.3, stop_ids=40)
        abort = rnd.choice([0, 3, 6]) if rnd.random() < 0.3 else None
        work.append((rnd.randint(0, 8), abort, GenerationRequest(
            f"r{i}", prompt, sp, adapter=rnd.choice([None, "a", "b"]), tenant=rnd.choice(["t1", "t2", "t3"]))))
    return work


def drive(engine: LLMEngine, work: list[tuple[int, int | None, GenerationRequest]]) -> dict[str, tuple]:
    """Add each request at its step, abort it once it has its count of tokens; step until done.
    -> request id: (tokens, logprob token ids, finish reason)."""
    import time

    got = {r.request_id: ([], [], None) for _, _, r in work}
    arrivals = sorted(work, key=lambda w: w[0])
    step = 0
    while arrivals or engine.has_unfinished():
        while arrivals and arrivals[0][0] <= step:
            engine.add_request(replace(arrivals.pop(0)[2]))
        for _, abort, r in work:
            tokens, _, finish = got[r.request_id]
            if abort is not None and finish is None and len(tokens) >= abort and r.request_id in engine._seqs:
                got[r.request_id] = (tokens, got[r.request_id][1], engine.abort(r.request_id).finish_reason.value)
        for out in engine.step():
            tokens, lps, finish = got[out.request_id]
            assert finish is None, f"{out.request_id}: an output after its end"
            got[out.request_id] = (tokens + out.token_ids, lps + [lp.token_id for lp in out.logprobs],
                                   out.finish_reason.value if out.finished else None)
        step += 1
        if engine.idle:  # waiting on adapter loads: leave the loader thread the GIL
            time.sleep(0.002)
    assert engine.allocator.num_used == 0 and not engine.scheduler.has_work()
    return got


def test_random_workloads_equal_the_synchronous_engine(tiny_llama_dir, adapter_dirs):
    """Random arrivals, aborts, stop ids, seeded sampling, penalties, adapters and tenants (fcfs
    and vtc) over a KV cache that preempts: the async engine gives every request the synchronous
    engine's tokens and finish, and some sequence is preempted with its token pending."""
    from server.engine.model_runner import KVCache
    from server.engine.policies import VTCPolicy

    arch = make(tiny_llama_dir, False).info.arch
    per_block = KVCache.bytes_per_block(arch.num_layers, 16, arch.num_kv_heads, arch.head_dim, torch.float32)
    preempted = 0
    for seed, blocks, max_num_seqs, vtc in ((4, 10, 4, False), (21, 8, 6, True), (24, 8, 4, False), (27, 8, 6, True)):
        work = random_workload(seed)
        got = {}
        for mode in (False, True):
            engine = make(tiny_llama_dir, mode, adapter_dirs, kv_bytes=blocks * per_block, max_num_seqs=max_num_seqs)
            if vtc:
                engine.scheduler.policy = VTCPolicy(input_weight=1.0, output_weight=2.0)
            schedule = engine.scheduler.schedule

            def counted(schedule=schedule):
                nonlocal preempted
                out = schedule()
                preempted += sum(1 for s in out.preempted if s.num_pending)
                return out
            engine.scheduler.schedule = counted
            got[mode] = drive(engine, work)
        assert got[True] == got[False], seed
    assert preempted, "no sequence was preempted with a token pending"
