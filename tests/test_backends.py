"""Attention and LoRA backends (server/engine/backends/): chosen once at start, and the whole
engine gives transformers' / PEFT's greedy tokens with each of them.

The Triton backends run here on CPU under Triton's interpreter, in a child process (the
interpreter must be switched on before triton is first imported, and must not leak into other
tests); on a GPU they are what `auto` picks (tests/test_gpu_engine.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from conftest import save_tiny_model  # noqa: E402
from kernels.paged_attention import cpp_available  # noqa: E402
from engine_runs import greedy_with_logprobs  # noqa: E402
from peft_adapters import greedy, make_peft_adapter  # noqa: E402
from server.cli import build_config, make_parser  # noqa: E402
from server.config import Config  # noqa: E402
from server.engine.backends import (BackendError, StepBatch, select_attention, select_lora)  # noqa: E402
from server.engine.backends.attention import CppAttention, TorchAttention  # noqa: E402
from server.engine.backends.lora import TorchLora, TritonLora  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.adapters.slots import LoraSlots  # noqa: E402
from server.model.arch import ModelArch  # noqa: E402

NEW = 8
LENGTHS = (3, 13, 21)
CPU = torch.device("cpu")
# model -> save_tiny_model overrides: plain attention, and Gemma 2's window + soft-capping
MODELS = {
    "llama": ("llama", dict(num_hidden_layers=2)),
    "gemma2": ("gemma2", dict(num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                              attn_logit_softcapping=1.5, final_logit_softcapping=6.0, tie_word_embeddings=True)),
}


# --- the engine, shared by this process and the Triton child ------------------------------------
def engine_tokens(model_dir: str, adapter_dir: str, jobs: list, attention: str, lora: str, device: str = "cpu"):
    """Greedy tokens and their logprobs of every job [(adapter or None, prompt)], all in one engine."""
    cfg = Config()
    cfg.model.dtype = "float32"
    cfg.model.device = device
    cfg.model.attention_backend = attention
    cfg.cache.kv_cache_memory = 2 << 20
    cfg.scheduler.max_num_batched_tokens = 16  # the longer prompts are prefilled in chunks, next to decodes
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {"ad": adapter_dir}
    cfg.lora.max_lora_rank = 8
    cfg.lora.lora_backend = lora
    engine = LLMEngine(cfg, model_dir)
    tokens, logprobs = greedy_with_logprobs(engine, jobs, NEW)
    runner = engine.runner
    return {"tokens": tokens, "logprobs": logprobs, "backends": [runner.attention.name, runner.lora.name]}


def _child() -> None:
    """Entry of the Triton child: cases as JSON on stdin, results as JSON on stdout."""
    cases = json.load(sys.stdin)
    results = {name: engine_tokens(c["model"], c["adapter"], c["jobs"], "triton", "triton")
               for name, c in cases.items()}
    print("RESULT " + json.dumps(results))


# --- cases and references -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    """name -> model dir, adapter dir, jobs (each prompt on the base and on the adapter) and PEFT's
    greedy tokens/logprobs for each job alone (base jobs with the adapter disabled)."""
    import peft
    import transformers

    out = {}
    for seed, (name, (model_type, overrides)) in enumerate(MODELS.items()):
        root = tmp_path_factory.mktemp(name)
        model_dir = save_tiny_model(root / "model", model_type, seed=3 + seed, **overrides)
        adapter_dir = make_peft_adapter(model_dir, root / "adapter", seed=4, std=0.2, r=8, lora_alpha=16,
                                        target_modules="all-linear")
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in LENGTHS]
        jobs = [(adapter, p) for p in prompts for adapter in ("ad", None)]
        model = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir)
        expected = []
        for adapter, prompt in jobs:
            with contextlib.nullcontext() if adapter else model.disable_adapter():
                expected.append(greedy(model, prompt, NEW))
        # the check has teeth: the adapter changes what the model says
        assert any(expected[i][0] != expected[i + 1][0] for i in range(0, len(jobs), 2))
        out[name] = dict(model=str(model_dir), adapter=str(adapter_dir), jobs=jobs, expected=expected)
    return out


def assert_matches(got: dict, expected: list) -> None:
    assert got["tokens"] == [e[0] for e in expected]
    for lps, (_, want) in zip(got["logprobs"], expected):
        assert lps == pytest.approx(want, abs=2e-4)


# --- the whole engine against transformers / PEFT -------------------------------------------------
@pytest.mark.parametrize("attention", ["cpp", "torch"])
@pytest.mark.parametrize("model", list(MODELS))
def test_cpu_backends_match_peft(cases, model, attention):
    if attention == "cpp" and not cpp_available():
        pytest.skip("the C++ extension does not build here")
    c = cases[model]
    got = engine_tokens(c["model"], c["adapter"], c["jobs"], attention, "torch")
    assert got["backends"] == [attention, "torch"]
    assert_matches(got, c["expected"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention, lora", [("triton", "triton"), ("torch", "torch")])
@pytest.mark.parametrize("model", list(MODELS))
def test_cuda_backends_match_peft(cases, model, attention, lora):
    c = cases[model]
    got = engine_tokens(c["model"], c["adapter"], c["jobs"], attention, lora, device="cuda")
    assert got["backends"] == [attention, lora]
    assert_matches(got, c["expected"])


def test_triton_backends_whole_engine_match_peft_under_the_interpreter(cases):
    """Triton paged attention + Triton SGMV through the whole engine (chunked prefill next to
    decodes, adapter and base-only sequences in one batch, Gemma 2's window and soft-cap)."""
    pytest.importorskip("triton")
    payload = {name: {k: c[k] for k in ("model", "adapter", "jobs")} for name, c in cases.items()}
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", "import test_backends; test_backends._child()"],
                       input=json.dumps(payload), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    for name, c in cases.items():
        assert results[name]["backends"] == ["triton", "triton"]
        assert_matches(results[name], c["expected"])


# --- selection -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def arch(cases) -> ModelArch:
    return ModelArch.from_dir(Path(cases["llama"]["model"]))


def test_auto_on_cpu_picks_cpp_attention_and_torch_lora(arch, caplog):
    with caplog.at_level("INFO", logger="server.engine.backends"):
        attention = select_attention("auto", arch, CPU, torch.float32)
        lora = select_lora("auto", CPU)
    assert attention.name == ("cpp" if cpp_available() else "torch")
    assert lora.name == "torch"
    assert f"attention backend: {attention.name} (auto for cpu" in caplog.text
    assert "lora backend: torch (auto for cpu" in caplog.text


def test_explicit_choices(arch):
    assert isinstance(select_attention("torch", arch, CPU, torch.float32), TorchAttention)
    assert isinstance(select_lora("torch", CPU), TorchLora)
    if cpp_available():
        assert isinstance(select_attention("cpp", arch, CPU, torch.bfloat16), CppAttention)


def test_impossible_choices_are_clear_errors(arch, monkeypatch):
    with pytest.raises(BackendError, match="cpp cannot run here: the C.. paged attention runs on CPU only"):
        select_attention("cpp", arch, torch.device("cuda"), torch.bfloat16)
    with pytest.raises(BackendError, match="cpp cannot run here: .*no torch.float16 kernel"):
        select_attention("cpp", arch, CPU, torch.float16)
    with pytest.raises(BackendError, match="expected auto or one of cpp, torch, triton, got 'flash'"):
        select_attention("flash", arch, CPU, torch.float32)
    # Triton on CPU tensors only under the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="attention-backend triton cannot run here: .*TRITON_INTERPRET=1"):
        select_attention("triton", arch, CPU, torch.float32)
    with pytest.raises(BackendError, match="lora-backend triton cannot run here: .*TRITON_INTERPRET=1"):
        select_lora("triton", CPU)
    # triton not installed (its import fails)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)
    for mod in ("kernels.triton_paged_attention", "kernels.triton_sgmv"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    with pytest.raises(BackendError, match="attention-backend triton cannot run here: triton is not installed"):
        select_attention("triton", arch, torch.device("cuda"), torch.bfloat16)
    with pytest.raises(BackendError, match="lora-backend triton cannot run here: triton is not installed"):
        select_lora("triton", torch.device("cuda"))


def test_auto_on_cuda_without_triton_falls_back_to_torch(arch, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "triton", None)  # triton's import fails
    for mod in ("kernels.triton_paged_attention", "kernels.triton_sgmv"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    cuda = torch.device("cuda")  # nothing here touches the device
    with caplog.at_level("INFO", logger="server.engine.backends"):
        assert isinstance(select_attention("auto", arch, cuda, torch.bfloat16), TorchAttention)
        assert isinstance(select_lora("auto", cuda), TorchLora)
    assert "attention backend: torch (auto for cuda; not triton: triton is not installed" in caplog.text
    assert "lora backend: torch (auto for cuda; not triton: triton is not installed" in caplog.text


def test_flags_reach_the_config_and_bad_names_are_refused(monkeypatch):
    parser = make_parser()
    cfg = build_config(parser.parse_args(["serve", "--attention-backend", "TORCH", "--lora-backend", "triton"]))
    assert (cfg.model.attention_backend, cfg.lora.lora_backend) == ("torch", "triton")
    monkeypatch.setenv("LORAMUX_ATTENTION_BACKEND", "cpp")
    assert build_config(parser.parse_args(["serve"])).model.attention_backend == "cpp"
    with pytest.raises(ValueError, match="--lora-backend: expected auto or one of torch, triton, got 'cpp'"):
        build_config(parser.parse_args(["serve", "--lora-backend", "cpp"]))


def test_server_refuses_to_start_with_an_impossible_backend(cases):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", cases["llama"]["model"],
                        "--device", "cpu", "--num-threads", "1", "--no-lora", "--attention-backend", "triton"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "loramux: --attention-backend triton cannot run here" in r.stderr
    assert "TRITON_INTERPRET=1" in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--lora-page-rank", "8"], "loramux: --lora-page-rank 8: the torch LoRA backend reads an unpaged pool"),
    (["--lora-pool-memory", "1000"], "loramux: --lora-pool-memory 1000 bytes holds no adapter"),
    (["--cuda-graph-sizes", "1,512"], "loramux: --cuda-graph-sizes 1,512: each size must be between 1 and "
                                      "--max-num-seqs (128)"),
])
def test_server_refuses_to_start_with_a_configuration_it_cannot_build(cases, flags, message):
    """A pool the LoRA backend cannot read or too small for one adapter, graph sizes beyond
    --max-num-seqs: exit 2 and one clear line."""
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", cases["llama"]["model"],
                        "--device", "cpu", "--num-threads", "1", *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_page_rank_is_each_lora_backends_choice():
    assert TorchLora(CPU).page_rank(64, None) == TorchLora(CPU).page_rank(64, 64) == 64
    triton = TritonLora(CPU)
    assert triton.page_rank(64, None) == 16 and triton.page_rank(16, None) == 16
    assert triton.page_rank(24, None) == 24 and triton.page_rank(64, 8) == 8  # 16 does not divide 24


# --- each backend builds its own per-step metadata, and only that ---------------------------------
def test_each_lora_backend_builds_only_its_layout(arch):
    slots = LoraSlots(arch, num_slots=4, max_rank=8, dtype=torch.float32, device=CPU, metrics=Metrics())
    t = TorchLora(CPU).segments([3, 2], [1, 3], [8, 8], slots.num_slots)
    s = TritonLora(CPU).segments([3, 2], [1, 3], [8, 8], slots.num_slots)
    assert t.slot_offsets.tolist() == [0, 3, 3, 5] and t.tiles is None and not t.tile_views
    assert s.slot_offsets is None and s.token_slots is None and s.pad_rows is None
    assert s.tile_range(16)[1] == 2 and s.starts.tolist() == [0, 3, 5]
    x, y = torch.randn(5, arch.hidden_size), torch.zeros(5, slots.offsets["o"][-1])
    slots.slot_groups[1] = slots.slot_groups[3] = frozenset(slots.groups)  # as if adapters were written there
    with pytest.raises(ValueError, match="built for \\('triton',\\), not for the 'torch' kernels"):
        TorchLora(CPU).applier(slots, s).apply(0, "o", x, y, None)


def test_cpp_attention_plans_its_fallback_per_step(cases):
    """The cpp backend runs C++ unless a layer needs what C++ lacks in this step: a window shorter
    than the step's longest context (torch), or soft-capping (torch on every layer)."""
    if not cpp_available():
        pytest.skip("the C++ extension does not build here")
    arch = ModelArch.from_dir(Path(cases["gemma2"]["model"]))  # windows (8) on alternate layers + soft-cap
    windowed = dataclasses.replace(arch, attn_softcap=None)

    def batch(ctx: int) -> StepBatch:
        return StepBatch(query_lens=(1,), context_lens=(ctx,), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                         token_seq=torch.zeros(1, dtype=torch.int32), token_ctx=torch.tensor([ctx], dtype=torch.int32),
                         slot_mapping=torch.tensor([ctx - 1]), block_size=16)

    backend = CppAttention(windowed, CPU, torch.float32)
    assert windowed.layer_windows[0] == 8
    assert backend.prepare(batch(8)).plan[0] == ("cpp", None)  # the window masks nothing yet
    assert backend.prepare(batch(9)).plan[0] == ("torch", 8)
    assert all(k == "torch" for k, _ in CppAttention(arch, CPU, torch.float32).prepare(batch(4)).plan)
