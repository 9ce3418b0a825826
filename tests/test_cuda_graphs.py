"""CUDA graphs for decode (server/engine/cuda_graphs.py), on CPU: the static LoRA table against
the dynamic one; and the whole engine with DecodeGraphs in its capture=False mode (the recorded
step replayed over the same static buffers) on the Triton backends under the interpreter, against
PEFT / transformers and the eager engine. Only the capture itself needs CUDA:
tests/test_gpu_engine.py; the ladder and the padding choice: tests/test_cuda_graph_ladder.py.

The interpreter tests run in-process when this module is first to import triton, else in a child.
"""

from __future__ import annotations

from triton_mode import CHILD, CUDA, rerun_in_child  # before anything imports triton

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.segments import STATIC_BLOCK_M, LoraSegments, fill_static, static_len, static_segments  # noqa: E402
from server.engine import cuda_graphs  # noqa: E402

from conftest import save_tiny_model  # noqa: E402
from engine_runs import drain, warm  # noqa: E402

try:
    from kernels import triton_sgmv
    INTERP = triton_sgmv.INTERPRETED
except ImportError:  # pragma: no cover
    triton_sgmv, INTERP = None, False
needs_interp = pytest.mark.skipif(not INTERP, reason="Triton interpreter not active in-process")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- no model (the ladder and the off switch: tests/test_cuda_graph_ladder.py) -------------------------
def test_static_table_layout_pads_segments_and_tiles():
    size = 8
    host = [-7] * (static_len(size) + 2)
    fill_static(host, 1, size, [2, 1], [5, 3], [4, 8])  # slots in any order
    t = host[1:1 + static_len(size)]
    assert host[0] == host[-1] == -7  # wrote only its range
    assert t[:size + 1] == [0, 2, 3, 3, 3, 3, 3, 3, 3]  # padded segments: start == end == 3 LoRA tokens
    assert t[size + 1:2 * size + 1] == [5, 3, 0, 0, 0, 0, 0, 0]
    assert t[2 * size + 1:3 * size + 1] == [4, 8, 0, 0, 0, 0, 0, 0]  # padded rank 0
    tiles = t[3 * size + 1:]
    assert tiles[:4] == [0, 0, 1, 2] and tiles[4:] == [size - 1, 3] * (size - 2)
    # a segment longer than one tile, in the largest table
    host = [0] * static_len(40)
    fill_static(host, 0, 40, [STATIC_BLOCK_M + 3], [1], [2])
    tiles = host[3 * 40 + 1:]
    assert tiles[:4] == [0, 0, 0, STATIC_BLOCK_M] and tiles[4:6] == [39, STATIC_BLOCK_M + 3]
    with pytest.raises(ValueError, match="do not fit"):
        fill_static([0] * static_len(2), 0, 2, [2, 1], [0, 1], [1, 1])


# --- kernels: static table == dynamic table -------------------------------------------------------
@needs_interp
def test_triton_interp_static_table_equals_the_dynamic_one():
    """Add LoRA through a padded static table (size 8: 5 LoRA rows in 3 segments, 2 base rows,
    1 padding row): the LoRA rows get what the dynamic table gives, the other rows nothing."""
    g = torch.Generator().manual_seed(0)
    size, num_slots, r_pad, k, outs = 8, 6, 8, 32, (24, 16, 16)
    seg_lens, seg_slots, seg_ranks = [2, 1, 2], [4, 1, 2], [8, 3, 5]
    a = torch.zeros(num_slots, 3 * r_pad, k)
    b = torch.zeros(num_slots, sum(outs), r_pad)
    for s, r in zip(seg_slots, seg_ranks):  # rank padding zero, as the pool holds it
        for i in range(3):
            a[s, i * r_pad: i * r_pad + r] = torch.randn(r, k, generator=g)
        b[s, :, :r] = torch.randn(sum(outs), r, generator=g)
    x = torch.randn(size, k, generator=g)
    y0 = torch.randn(size, sum(outs), generator=g)
    offsets = (0, 24, 40, 56)

    order = sorted(range(3), key=seg_slots.__getitem__)  # the dynamic table wants ascending slots
    starts = [0, 2, 3, 5]
    rows = [r for i in order for r in range(starts[i], starts[i + 1])]
    dyn = LoraSegments.build([seg_lens[i] for i in order], [seg_slots[i] for i in order],
                             [seg_ranks[i] for i in order], num_slots, "cpu", layouts=("triton",))
    y_dyn = y0[rows].clone()
    h = triton_sgmv.sgmv_shrink(x[rows], a, dyn, n_slices=3)
    triton_sgmv.sgmv_expand(y_dyn, h, b, dyn, offsets)

    host = [0] * static_len(size)
    fill_static(host, 0, size, seg_lens, seg_slots, seg_ranks)
    seg = static_segments(torch.tensor(host, dtype=torch.int32), size, num_slots)
    y = y0.clone()
    h = triton_sgmv.sgmv_shrink(x, a, seg, n_slices=3)
    triton_sgmv.sgmv_expand(y, h, b, seg, offsets)
    assert (y_dyn - y0[rows]).abs().max() > 0.1  # the check has teeth
    torch.testing.assert_close(y[rows], y_dyn, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[5:], y0[5:])  # base and padding rows untouched


# --- the whole engine with DecodeGraphs(capture=False) --------------------------------------------
ADAPTERS = {  # different ranks; "b" on every projection
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "c": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
}
# (adapter, prompt length, new tokens): one decode step each of 6, 5, 4 and 3 rows (ladder 1, 2, 4,
# 8: 6, 5 and 3 are padded), LoRA and base-only rows together, then one base-only row alone. The
# 13-token prompt's last decode (3 rows) reads position 16: its second KV block, and the second of
# the graphs' attention splits (16 keys each at this length).
JOBS = [("a", 5, 5), ("b", 9, 4), (None, 4, 6), ("c", 7, 2), ("a", 13, 5), (None, 6, 3)]


def _engine(model_dir, adapters: dict, graphs: bool, monkeypatch, async_scheduling: bool = False,
            sizes: tuple[int, ...] | None = None, **lora):
    from server.config import Config
    from server.engine.engine import LLMEngine

    if graphs:  # what a CUDA device with these backends gets; here capture=False (device cpu)
        from kernels import triton_paged_attention

        monkeypatch.setattr(cuda_graphs, "unavailable", lambda *args: None)
        # as on a GPU, the graphs' attention splits keys for the longest context (512 positions):
        # 4 splits of 128, so the short contexts here leave splits without keys
        monkeypatch.setattr(triton_paged_attention, "launch_config", lambda *args: dict(BLOCK_N=16, NUM_SPLITS=4))
    cfg = Config()
    cfg.model.dtype = "float32"
    cfg.model.device = "cpu"
    cfg.model.attention_backend = "triton"
    cfg.model.enforce_eager = not graphs
    cfg.model.cuda_graph_sizes = sizes  # None: the ladder of max_num_seqs 8, (1, 2, 4, 8)
    cfg.cache.kv_cache_memory = 1 << 20
    cfg.scheduler.max_num_seqs = 8
    cfg.scheduler.async_scheduling = async_scheduling
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {n: str(p) for n, p in adapters.items()}
    cfg.lora.max_lora_rank = 8
    cfg.lora.lora_backend = "triton"
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    engine = LLMEngine(cfg, model_dir)
    monkeypatch.undo()
    return engine


def _run(engine, jobs, prompts, experts=None) -> tuple[list, list]:
    from server.engine.request import GenerationRequest, SamplingParams

    for i, ((adapter, _, new), prompt) in enumerate(zip(jobs, prompts)):
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=0)
        engine.add_request(GenerationRequest(f"r{i}", prompt, params, adapter=None if adapter == "mix" else adapter,
                                             experts=experts if adapter == "mix" else None))
    return drain(engine, len(jobs))


@pytest.fixture(scope="module")
def graph_model_dir(tmp_path_factory):
    """The tiny Llama with 2 layers instead of 3: every interpreted step runs each layer's kernels
    program by program in Python, and two layers already exercise the per-layer tables and slots."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-2"), "llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def adapter_dirs(graph_model_dir, tmp_path_factory):
    from peft_adapters import make_peft_adapter

    root = tmp_path_factory.mktemp("graph-adapters")
    return {n: make_peft_adapter(graph_model_dir, root / n, seed=10 + i, std=0.2, **kw)
            for i, (n, kw) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def jobs_case(graph_model_dir, adapter_dirs) -> tuple[list, list]:
    """JOBS' prompts and PEFT's (tokens, logprobs) for each, batch 1: what every engine run of
    JOBS must give (the reference is computed once for the module)."""
    from peft_adapters import peft_greedy

    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for _, n, _ in JOBS]
    return prompts, [peft_greedy(graph_model_dir, adapter_dirs[a] if a else None, p, new)
                     for (a, _, new), p in zip(JOBS, prompts)]


@needs_interp
def test_triton_interp_graph_decode_matches_peft_and_eager(graph_model_dir, adapter_dirs, jobs_case, monkeypatch):
    prompts, expected = jobs_case
    engine = _engine(graph_model_dir, adapter_dirs, True, monkeypatch)
    runner = engine.runner
    assert runner.graphs is not None and runner.graphs.ladder == (1, 2, 4, 8)
    assert {g.config["NUM_SPLITS"] for g in runner.graphs.attention_steps} == {4}
    # the scratch block: one past the allocator's, never handed out
    assert engine.kv_cache.num_blocks == engine.allocator.num_blocks + 1
    scratch = engine.allocator.num_blocks
    warm(engine, adapter_dirs)  # every prefill in the first step: which graphs run is then fixed
    tokens, logprobs = _run(engine, JOBS, prompts)

    assert tokens == [e[0] for e in expected]
    for got, (_, want) in zip(logprobs, expected):
        assert got == pytest.approx(want, abs=2e-4)
    # which graphs ran: 6 rows padded to 8, then 5; 4 and 3 rows on the graph of 4; then the
    # base-only row alone on the graph without LoRA
    assert runner.graph_steps == {(8, True): 2, (4, True): 2, (1, False): 1}, runner.graph_steps
    assert runner.eager_steps >= 1  # prefill steps
    bs = engine.kv_cache.block_size
    cache = engine.kv_cache.tensor
    assert cache[:, scratch * bs:].abs().sum() > 0, "padding rows wrote somewhere else"
    assert engine.allocator.num_free == engine.allocator.num_blocks  # all freed; scratch never was a block

    eager = _engine(graph_model_dir, adapter_dirs, False, monkeypatch)
    assert eager.runner.graphs is None and eager.kv_cache.num_blocks == eager.allocator.num_blocks
    e_tokens, e_logprobs = _run(eager, JOBS, prompts)
    assert e_tokens == tokens and not eager.runner.graph_steps
    for got, want in zip(logprobs, e_logprobs):
        assert got == pytest.approx(want, abs=1e-5)


@needs_interp
def test_triton_interp_async_scheduling_replays_graphs_over_pending_tokens(graph_model_dir, adapter_dirs,
                                                                           jobs_case, monkeypatch):
    """Async scheduling: a decode step is launched before the host has the tokens it decodes; the
    graph's ids of those rows are written on the device from the step before. PEFT's tokens."""
    prompts, expected = jobs_case
    engine = _engine(graph_model_dir, adapter_dirs, True, monkeypatch, async_scheduling=True)
    warm(engine, adapter_dirs)
    tokens, logprobs = _run(engine, JOBS, prompts)
    assert tokens == [e[0] for e in expected]
    for got, (_, want) in zip(logprobs, expected):
        assert got == pytest.approx(want, abs=2e-4)
    assert {with_lora for _, with_lora in engine.runner.graph_steps} == {True, False}, engine.runner.graph_steps


@needs_interp
def test_triton_interp_a_non_finite_row_of_a_graph_decode_fails_alone(graph_model_dir, adapter_dirs, monkeypatch,
                                                                     tmp_path):
    """A graph decode step with a row whose logits are NaN (a model with one embedding at
    infinity: tests/non_finite_model.py), with async scheduling: that request ends with a
    non_finite_logits error after its one finite token, after the step launched on its marked
    row; the LoRA and base rows replayed with it keep PEFT's tokens (the sampler is the eager
    path's: test_sampler_non_finite.py runs both modes there)."""
    from non_finite_model import BAD_PROMPT, poisoned_copy
    from peft_adapters import peft_greedy
    from server.engine.request import GenerationRequest, SamplingParams

    poisoned = poisoned_copy(graph_model_dir, tmp_path / "poisoned")
    good = [("a", [317, 84, 247, 85]), (None, [137, 12, 113, 151, 249, 75])]
    expected = [peft_greedy(poisoned.path, adapter_dirs[a] if a else None, p, 3)[0] for a, p in good]
    assert all(poisoned.token not in e for e in expected)
    engine = _engine(poisoned.path, adapter_dirs, True, monkeypatch, async_scheduling=True)
    warm(engine, ["a"])
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=1)
    for i, (adapter, prompt) in enumerate([*good, (None, BAD_PROMPT)]):
        engine.add_request(GenerationRequest(f"r{i}", prompt, params, adapter=adapter))
    tokens: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in errors, "an output after the error"
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.error is not None:
                errors[out.request_id] = out.error_code
    assert [tokens["r0"], tokens["r1"]] == expected
    assert tokens["r2"] == [poisoned.token] and errors == {"r2": "non_finite_logits"}
    assert (4, True) in engine.runner.graph_steps, engine.runner.graph_steps  # the NaN row's step replayed
    assert engine.allocator.num_used == 0


@needs_interp
def test_graphs_end_at_hidden_states_and_replay_gives_logits_of_the_real_rows(graph_model_dir, adapter_dirs,
                                                                                monkeypatch):
    """A captured graph's output stays allocated in the shared graph pool for the engine's life, so
    the graphs end at the final hidden states [size, hidden]: [size, vocab] float32 logits per graph
    held ~4 GB at an 8B model's 128k vocabulary over a ladder to 256. The replay computes the logits
    of its real rows only. Two sizes (each graph's run is a whole interpreted step): 3 rows padded to 4."""
    engine = _engine(graph_model_dir, adapter_dirs, True, monkeypatch, sizes=(1, 4))
    graphs, arch = engine.runner.graphs, engine.info.arch
    assert set(graphs.graphs) == {(1, False), (1, True), (4, False), (4, True)}
    for (size, with_lora), graph in graphs.graphs.items():
        lay = cuda_graphs._Layout(size, graphs.width)
        graphs._fill_padding(lay, with_lora)
        graphs._dev.copy_(graphs._host_tensor)
        assert graph.run().shape == (size, arch.hidden_size), (size, with_lora)
    logits, size = graphs.replay([3, 4, 5], [0, 1, 2], [[0]] * 3, None)
    assert size == 4 and logits.shape == (3, arch.vocab_size) and logits.dtype == torch.float32


@needs_interp
def test_triton_interp_the_memory_plans_graph_profile_is_a_graph_steps_forward(graph_model_dir):
    """server/engine/memory_plan.py sizes the graph pool from `profile_decode`: the forward a graph of
    that many rows captures (the attention's graph step, launch sizes for max_model_len). Each of its
    rows decodes token 0 at position 0: the logits are those of that one-token prompt through the
    eager torch attention (`profile_prefill` of one token)."""
    from server.engine.backends import select_attention
    from server.engine.memory_plan import profile_decode, profile_prefill
    from server.engine.sampler import _top_p
    from server.model.arch import ModelArch
    from server.model.decoder import DecoderModel
    from server.model.loading import load_weights

    arch, cpu = ModelArch.from_dir(graph_model_dir), torch.device("cpu")
    model = DecoderModel(arch, load_weights(graph_model_dir, arch, torch.float32, cpu), max_positions=64)
    hidden = profile_decode(model, select_attention("triton", arch, cpu, torch.float32), 4, max_len=64, block_size=16)
    assert hidden.shape == (4, arch.hidden_size)
    ref = profile_prefill(model, select_attention("torch", arch, cpu, torch.float32), 1, 1, max_len=64, block_size=16)
    torch.testing.assert_close(_top_p(model.logits(hidden), [0.9] * 4), ref.expand(4, -1), atol=1e-4, rtol=1e-4)


# What reads a tensor's values on the host: on a GPU each waits for the device (a synchronisation).
HOST_READS = ("tolist", "item", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@needs_interp
def test_a_graph_decode_step_reads_the_device_once(graph_model_dir, adapter_dirs, monkeypatch):
    """A decode step on a graph, greedy and without logprobs, reads values back from tensors once in
    our code (server/, kernels/): the sampled tokens. Everything else on the step path (scheduling,
    adapter activation, the one input copy, the replay, the logits) must not wait for the device:
    on a GPU the host queues the step and meets it at that one read."""
    from pathlib import Path

    from server.engine.request import GenerationRequest, SamplingParams

    root = str(Path(__file__).resolve().parents[1])
    engine = _engine(graph_model_dir, adapter_dirs, True, monkeypatch)
    warm(engine, ["a", "b"])
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, (adapter, prompt) in enumerate([("a", [5, 6, 7]), (None, [8, 9]), ("b", [10, 11, 12, 13])]):
        engine.add_request(GenerationRequest(f"s{i}", prompt, params, adapter=adapter))
    engine.step()  # the prefills (eager)
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(root) and "/tests/" not in caller:
                reads.append(f"{name} from {caller[len(root) + 1:]}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    graph_steps = sum(engine.runner.graph_steps.values())
    for _ in range(2):
        reads.clear()
        outs = engine.step()
        assert len(outs) == 3 and all(len(o.token_ids) == 1 for o in outs)
        assert reads == [reads[0]] and reads[0].startswith("tolist from server/engine/sampler.py"), reads
    monkeypatch.undo()
    assert sum(engine.runner.graph_steps.values()) == graph_steps + 2  # both were graph steps
    while engine.has_unfinished():
        engine.step()


@needs_interp
def test_capture_warm_up_gets_an_empty_lora_table(graph_model_dir, adapter_dirs, monkeypatch):
    """Capture runs each size's step once over padding inputs, largest size first. The buffer
    still holds the last fill (a larger size's, or a served step's) where a smaller size keeps its
    LoRA table: that warm-up must read an empty table, not those values as segment starts, slots
    and ranks (out of range for its rows and for the pool: an illegal address on a GPU)."""
    graphs = _engine(graph_model_dir, adapter_dirs, True, monkeypatch).runner.graphs
    n = graphs.max_size
    graphs._fill(cuda_graphs._Layout(n, graphs.width), [300] * n, [5] * n, [[3]] * n,
                 ([n], [graphs.slots.num_slots - 1], [8]))  # a served step of the largest size
    for size in reversed(graphs.ladder[:-1]):
        lay = cuda_graphs._Layout(size, graphs.width)
        graphs._fill_padding(lay, with_lora=True)
        t = list(graphs._host[lay.lora: lay.tables])
        starts, ranks, tiles = t[:size + 1], t[2 * size + 1: 3 * size + 1], t[3 * size + 1:]
        assert starts == [0] * (size + 1) and ranks == [0] * size, (size, t)
        assert all(m0 >= starts[seg + 1] for seg, m0 in zip(tiles[::2], tiles[1::2])), (size, t)  # no tile has a row


@needs_interp
def test_triton_interp_mixtures_and_dora_run_eager(graph_model_dir, adapter_dirs, tmp_path, monkeypatch):
    from peft_adapters import make_peft_adapter
    from server.engine.request import Mixture

    dora = make_peft_adapter(graph_model_dir, tmp_path / "d", seed=3, std=0.2, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"], use_dora=True)
    engine = _engine(graph_model_dir, {"a": adapter_dirs["a"], "d": dora}, True, monkeypatch)
    runner = engine.runner
    prompt = list(range(3, 9))
    warm(engine, ["a", "d"])  # else a base-only row may decode alone (on a graph) while "d" loads

    def decode_steps(jobs, experts=None) -> tuple[int, int]:
        graph0, eager0 = sum(runner.graph_steps.values()), runner.eager_steps
        _run(engine, jobs, [prompt] * len(jobs), experts)
        return sum(runner.graph_steps.values()) - graph0, runner.eager_steps - eager0

    graph, eager = decode_steps([("d", 6, 4), (None, 6, 4)])
    assert graph == 0 and eager == 4  # a DoRA row: every step eager (a prefill, 3 decodes)
    mix = Mixture(adapters=("a",), weights=(0.5,))
    graph, eager = decode_steps([("mix", 6, 4), ("a", 6, 4)], mix)
    assert graph == 0 and eager == 4  # a mixture row: eager
    assert decode_steps([("a", 6, 4), (None, 6, 4)]) == (3, 1)  # "a" resident: prefill eager, then graphs


@pytest.mark.skipif(INTERP or CUDA or CHILD or triton_sgmv is None,
                    reason="interpreter tests already ran in-process (or no triton)")
def test_triton_interp_in_subprocess():
    rerun_in_child(__file__)  # triton was imported before this module could switch the interpreter on
