"""The whole engine on a GPU (Triton SGMV kernels, paged attention on CUDA tensors) gives the
same greedy tokens as transformers / PEFT, with CUDA graphs for decode (the default) and with
--enforce-eager. Skipped on machines without CUDA."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams

from peft_adapters import make_peft_adapter, peft_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ADAPTERS = {
    "r4-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r16-all": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "r64-rslora": dict(r=64, lora_alpha=16, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r8-pattern": dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], rank_pattern={"o_proj": 2}),
}


def gpu_engine(model_dir: Path, adapters: dict[str, Path], dtype: str, enforce_eager: bool = False,
               max_num_seqs: int = 128, page_rank: int | None = None, async_scheduling: bool = False) -> LLMEngine:
    """With max rank 64 the triton backend's pool is paged (page rank 16) unless `page_rank` is 64."""
    cfg = Config()
    cfg.model.device = "cuda"
    cfg.model.dtype = dtype
    cfg.model.enforce_eager = enforce_eager
    cfg.scheduler.max_num_seqs = max_num_seqs
    cfg.scheduler.async_scheduling = async_scheduling
    cfg.cache.kv_cache_memory = 64 << 20
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {n: str(p) for n, p in adapters.items()}
    cfg.lora.max_lora_rank = 64
    cfg.lora.lora_page_rank = page_rank
    return LLMEngine(cfg, model_dir)


def run(engine: LLMEngine, jobs, new: int | list[int]) -> list[list[int]]:
    news = new if isinstance(new, list) else [new] * len(jobs)
    for i, ((adapter, prompt), n) in enumerate(zip(jobs, news)):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        engine.add_request(GenerationRequest(f"g{i}", prompt, params, adapter=adapter))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return [out[f"g{i}"] for i in range(len(jobs))]


def test_mixed_lora_batch_on_gpu_equals_peft(tiny_llama_dir, tmp_path):
    adapters = {n: make_peft_adapter(tiny_llama_dir, tmp_path / n, seed=i, **kw)
                for i, (n, kw) in enumerate(ADAPTERS.items())}
    g = torch.Generator().manual_seed(3)
    names = [*ADAPTERS, None, "r16-all", None]
    jobs = [(n, torch.randint(2, 320, (5 + 7 * i,), generator=g).tolist()) for i, n in enumerate(names)]
    expected = [peft_greedy(tiny_llama_dir, adapters[a] if a else None, p, 20)[0] for a, p in jobs]
    assert run(gpu_engine(tiny_llama_dir, adapters, "float32"), jobs, 20) == expected


def test_bf16_on_gpu_stays_close_to_fp32_peft(tiny_llama_dir, tmp_path):
    adapters = {n: make_peft_adapter(tiny_llama_dir, tmp_path / n, seed=i, std=0.1, **kw)
                for i, (n, kw) in enumerate(ADAPTERS.items())}
    prompt = list(range(10, 40))
    engine = gpu_engine(tiny_llama_dir, adapters, "bfloat16")
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0)
    for n in [*ADAPTERS, None]:
        engine.add_request(GenerationRequest(f"b-{n}", prompt, params, adapter=n))
    got = {}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] = o.logprobs[0]
    import peft
    import transformers

    for n in [*ADAPTERS, None]:
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        if n is not None:
            model = peft.PeftModel.from_pretrained(model, adapters[n])
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
        lp = got[f"b-{n}"]
        assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=0.1)
        assert ref[lp.token_id] >= ref.max() - 0.2  # bf16 picked the top token or a near-tie


@pytest.fixture(scope="module")
def gpu_adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-adapters")
    return {n: make_peft_adapter(tiny_llama_dir, root / n, seed=i, **kw)
            for i, (n, kw) in enumerate(ADAPTERS.items())}


# Mixed adapters and base-only rows; new tokens chosen so the decode batch shrinks through sizes off
# the ladder (max_num_seqs 12: ladder 1, 2, 4, 8, 12): 7, 6, 5 and 3 rows are padded; the last two
# rows are base-only.
GRAPH_JOBS = [*ADAPTERS, None, "r16-all", None, "r4-qv"]
GRAPH_NEW = [12, 9, 14, 6, 18, 10, 16, 7]


@pytest.mark.parametrize("page_rank", [None, 64], ids=["paged", "unpaged"])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_decode_graphs_and_eager_equal_peft(tiny_llama_dir, gpu_adapters, enforce_eager, page_rank,
                                            async_scheduling):
    if async_scheduling and (page_rank is not None or enforce_eager):
        pytest.skip("async scheduling: one run, on graphs over the paged pool (its eager steps are the prefills)")
    g = torch.Generator().manual_seed(4)
    jobs = [(n, torch.randint(2, 320, (4 + 5 * i,), generator=g).tolist()) for i, n in enumerate(GRAPH_JOBS)]
    expected = [peft_greedy(tiny_llama_dir, gpu_adapters[a] if a else None, p, n)[0]
                for (a, p), n in zip(jobs, GRAPH_NEW)]
    engine = gpu_engine(tiny_llama_dir, gpu_adapters, "float32", enforce_eager=enforce_eager, max_num_seqs=12,
                        page_rank=page_rank, async_scheduling=async_scheduling)
    assert engine.adapters.pool.paged == (page_rank is None)
    runner = engine.runner
    assert (runner.graphs is None) == enforce_eager
    assert run(engine, jobs, GRAPH_NEW) == expected
    if enforce_eager:
        assert not runner.graph_steps
    else:
        assert runner.graphs.ladder == (1, 2, 4, 8, 12)
        sizes = {size for size, _ in runner.graph_steps}
        assert {8, 4} <= sizes and {(2, False), (1, False)} <= set(runner.graph_steps), runner.graph_steps


def test_decode_graph_replay_does_not_synchronise(tiny_llama_dir, gpu_adapters):
    """The replay and its one input copy (from pinned memory) never wait for the device; the
    sampling after it may (it reads the tokens)."""
    engine = gpu_engine(tiny_llama_dir, gpu_adapters, "bfloat16", max_num_seqs=8)
    jobs = [("r16-all", [5, 6, 7]), (None, [8, 9]), ("r4-qv", [10, 11, 12, 13])]
    run(engine, jobs, 3)  # adapters resident, kernels warm
    graphs, slots = engine.runner.graphs, engine.adapters.activate([]).slots
    lora = ([1, 1], [0, 1], [slots.slot_rank[0], slots.slot_rank[1]])
    tables = [[engine.allocator.num_blocks - 1]] * 3  # a block of the cache; any will do
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lo in (lora, None):
            logits, size = graphs.replay([3, 4, 5], [0, 1, 2], tables, lo)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert size == 4 and logits.shape == (3, engine.info.arch.vocab_size)
    assert torch.isfinite(logits).all()

    # Back to back, the first replay's input copy queued behind ~25 ms of GPU work (as behind the
    # step before): the second refills the pinned input buffer only once that copy has run, so
    # each replay decodes its own tokens. Rows on blocks of their own: logits follow the ids alone.
    tables = [[engine.allocator.num_blocks - 1], [engine.allocator.num_blocks - 2]]
    alone = []
    for ids in ([3, 4], [9, 10]):
        alone.append(graphs.replay(ids, [0, 0], tables, None)[0].clone())
        torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # cycles
    first = graphs.replay([3, 4], [0, 0], tables, None)[0]
    second = graphs.replay([9, 10], [0, 0], tables, None)[0]
    assert torch.equal(first, alone[0]) and torch.equal(second, alone[1])
    assert not torch.equal(alone[0], alone[1])


SAMPLED = [dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=7),
           dict(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2),
           dict(temperature=0.0)]


@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_graph_decode_step_waits_for_the_device_once_on_gpu(tiny_llama_dir, gpu_adapters, sampling,
                                                              async_scheduling, monkeypatch):
    """A whole engine step that decodes on a graph (without logprobs) waits for the device once, for
    the sampled tokens' copy to the host: scheduling, activation of resident adapters, the input
    copy, the replay, the logits and the sampling parameters' upload are queued without waiting.
    Waits counted: torch's sync debug mode (implicit synchronisations) and CUDA event waits (which
    it does not see). Sampled: temperature, top-k/p, min-p, a seed, penalties, and a greedy row.
    Async: the step waits for the tokens of the step before it, not its own."""
    engine = gpu_engine(tiny_llama_dir, gpu_adapters, "bfloat16", max_num_seqs=8, async_scheduling=async_scheduling)
    jobs = [("r16-all", [5, 6, 7]), (None, [8, 9]), ("r4-qv", [10, 11, 12, 13])]
    run(engine, jobs, 3)  # adapters resident, kernels compiled
    for i, (adapter, prompt) in enumerate(jobs):
        kw = SAMPLED[i] if sampling == "sampled" else dict(temperature=0.0)
        params = SamplingParams(max_tokens=5, ignore_eos=True, **kw)
        engine.add_request(GenerationRequest(f"s{i}", prompt, params, adapter=adapter))
    from server.engine.sampler import SampledStep

    runner = engine.runner
    event_waits = []
    made: list[SampledStep] = []  # every step's sampled tokens, in launch order
    taken: list[SampledStep] = []  # those the host waited for, in order
    event_sync, init, output = torch.cuda.Event.synchronize, SampledStep.__init__, SampledStep.output
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda e: (event_waits.append(e), event_sync(e))[1])
    monkeypatch.setattr(SampledStep, "__init__", lambda self, *a: (made.append(self), init(self, *a))[1])
    monkeypatch.setattr(SampledStep, "output", lambda self: (taken.append(self), output(self))[1])
    engine.step()  # the prefills (eager)
    for _ in range(2):
        graph_steps = sum(runner.graph_steps.values())
        event_waits.clear()
        taken.clear()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                outs = engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert sum(runner.graph_steps.values()) == graph_steps + 1 and len(outs) == 3
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) + len(event_waits) == 1, (syncs, event_waits)
        assert taken == [made[-2] if async_scheduling else made[-1]]
    monkeypatch.undo()
    while engine.has_unfinished():
        engine.step()


def test_without_kv_cache_memory_a_cuda_engine_sizes_its_cache_from_the_gpu(tiny_llama_dir):
    """No --kv-cache-memory on CUDA: the cache gets what --gpu-memory-utilization leaves after the
    weights, the adapter pool, a profile step and the graphs' reserve: more than the old fixed
    2 GiB on any GPU this check runs on, under the fraction of the device; and it serves the same
    greedy tokens as a 64 MiB cache. 0.5, not the 0.9 default: the GPU tests after this one share
    the process (the engine is dropped at the end, but an error's traceback would keep it)."""
    import gc

    from server.config import GiB

    cfg = Config()
    cfg.model.device, cfg.model.dtype, cfg.lora.adapters_dir = "cuda", "bfloat16", None
    cfg.cache.gpu_memory_utilization = 0.5
    assert cfg.cache.kv_cache_memory is None
    engine = LLMEngine(cfg, tiny_llama_dir)
    try:
        total = torch.cuda.mem_get_info()[1]
        kv_bytes = engine.kv_cache.tensor.nbytes
        assert 2 * GiB < kv_bytes < 0.5 * total, (kv_bytes, total)
        assert engine.info.max_model_len == 512  # the tiny model's: nothing capped
        assert engine.runner.graphs is not None  # the plan reserved room for them and they were captured
        jobs = [(None, [5, 6, 7]), (None, [9, 8])]
        assert run(engine, jobs, 8) == run(gpu_engine(tiny_llama_dir, {}, "bfloat16"), jobs, 8)
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()
