"""Decode throughput at N concurrent streams: this engine vs transformers `generate` vs the
weight-GEMM floor (the model's weight matmuls alone at that batch size: no engine beats it).

All three run in this one process on the same prompts and weights. Decode throughput is
measured the same way for the engine and for transformers:
    B * (N - 1) / (time to generate N tokens - time to generate 1 token)
so prompt processing is excluded from both.

    python loadtest/bench_engine.py --streams 1 8 32 64 --new-tokens 32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from server.config import Config
from server.engine.device import resolve_dtype
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root
from loadtest.closed_loop import step_to_end  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis briefly.",
    "List three uses of copper.", "Why is the sky blue?", "Give me a tip for learning to cook.",
    "What does a compiler do?", "Describe a cat to someone who has never seen one.",
]


def chat_prompts(engine: LLMEngine, n: int) -> list[list[int]]:
    tok = engine.tokenizer
    return [tok.encode(tok.render_chat([{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}]),
                       add_special_tokens=False) for i in range(n)]


def engine_time(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"b{time.monotonic_ns()}-{i}", p, params))
    step_to_end(engine, len(prompts), new_tokens)
    return time.perf_counter() - t0


def hf_time(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    if out.shape != (len(prompts), width + new_tokens):
        raise RuntimeError(f"transformers returned {tuple(out.shape)}, not {len(prompts)} x {width} + {new_tokens}")
    return time.perf_counter() - t0


def gemm_floor_step(engine: LLMEngine, batch: int, dtype: torch.dtype, repeats: int = 7) -> float:
    """Seconds for one decode step's weight GEMMs (every layer's qkv/o/gate_up/down + lm_head)."""
    w = engine.model.w
    mats = [m.to(dtype) for layer in w.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    mats.append(w.lm_head.to(dtype))
    xs = {m.shape[1]: torch.randn(batch, m.shape[1], dtype=dtype, device=m.device) for m in mats}
    sync = torch.cuda.synchronize if mats[0].is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for r in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            for m in mats:
                F.linear(xs[m.shape[1]], m)
            sync()
            if r:  # the first pass warms up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per system and batch size, interleaved; the median is reported")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from server.api.app import resolve_model_dir

    cfg = Config()
    cfg.model.path = args.model
    cfg.model.dtype = args.dtype
    cfg.model.device = args.device
    cfg.lora.enabled = False
    cfg.scheduler.max_num_seqs = max(args.streams)
    cfg.scheduler.max_num_batched_tokens = 2048
    model_dir = resolve_model_dir(cfg)
    engine = LLMEngine(cfg, model_dir)
    dtype = engine.info.dtype
    hf = None
    if not args.skip_hf:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=dtype).eval()
        hf.to(engine.info.device)
    pad = engine.info.arch.eos_token_ids[0] if engine.info.arch.eos_token_ids else 0

    print(f"model {engine.info.model_name}  dtype {dtype}  threads {torch.get_num_threads()}  "
          f"new tokens {args.new_tokens}  device {engine.info.device}  (auto dtype here: {resolve_dtype('auto', engine.info.device)})")
    header = (f"{'streams':>7} | {'engine tok/s':>12} | {'HF tok/s':>9} | {'engine/HF':>9} | "
              f"{'floor fp32':>10} | {'floor bf16':>10} | {'engine/best floor':>17}")
    print(header)
    print("-" * len(header))
    N = args.new_tokens
    engine_time(engine, chat_prompts(engine, 2), 4)  # warm-up
    for B in args.streams:
        prompts = chat_prompts(engine, B)
        # Interleave the systems so that a noisy spell on this shared machine hits both alike.
        eng_runs, hf_runs = [], []
        for _ in range(args.repeats):
            eng_runs.append(B * (N - 1) / (engine_time(engine, prompts, N) - engine_time(engine, prompts, 1)))
            if hf is not None:
                hf_runs.append(B * (N - 1) / (hf_time(hf, prompts, N, pad) - hf_time(hf, prompts, 1, pad)))
        eng = statistics.median(eng_runs)
        hf_tps = statistics.median(hf_runs) if hf_runs else float("nan")
        floor32 = B / gemm_floor_step(engine, B, torch.float32)
        floor16 = B / gemm_floor_step(engine, B, torch.bfloat16)
        best = max(floor32, floor16)
        print(f"{B:>7} | {eng:>12.1f} | {hf_tps:>9.1f} | {eng / hf_tps:>8.2f}x | {floor32:>10.1f} | "
              f"{floor16:>10.1f} | {eng / best:>16.0%}", flush=True)


if __name__ == "__main__":
    main()
