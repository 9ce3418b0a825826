"""Host work per decode step: what the engine's Python costs around the model, at 1 to 256 streams.

On a GPU a decode step's model work is one CUDA-graph replay, and everything else the engine does
between two replays (scheduling, building the step's inputs, reading the sampled tokens back,
turning them into outputs, metrics) is time the GPU waits, unless scheduling overlaps the step (vLLM's
async scheduling, SGLang's overlap scheduler). This measures that host work on the machine at
hand, on a tiny random model whose forward is little more than op dispatch, split by timers around
the engine's parts (patched for the run only):

    schedule   Scheduler.schedule (admission, KV blocks, adapter room)
    prepare    ModelRunner.execute less the model's forward and the sampler: the step's inputs,
               the LoRA tables, the logits of the sampled rows
    forward    DecoderModel.forward, or DecodeGraphs.replay where CUDA graphs run the step (the
               peer: on a GPU a replay only launches; the wait for the GPU falls in `sample`)
    sample     Sampler.sample (greedy here; includes reading the tokens back to the host)
    outputs    LLMEngine.step less the above: tokens appended, outputs, metrics, gauges

All in microseconds per decode step (the prefill step is not counted), for the base model and with
every request on one of `--adapters` rank-8 q/v adapters; every request must return `--tokens`.

    python -m loadtest.bench_step_overhead --streams 1 8 64 256 --tokens 32 --adapters 8
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from loadtest.gpu_bench import TINY, write_model_dir
from loadtest.many_adapters_ceiling import Timers
from loadtest.random_adapters import make_store

PARTS = ("schedule", "prepare", "forward", "sample", "outputs")


def tiny_model(path: Path) -> Path:
    """A random-weight Llama of gpu_bench's TINY shape, as a model directory."""
    import transformers

    write_model_dir(path, TINY)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    return path


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def make_engine(model: Path, store: Path | None, streams: int, device: str):
    from server.config import Config
    from server.engine.engine import LLMEngine

    cfg = Config()
    cfg.model.device = device
    cfg.scheduler.max_num_seqs = max(cfg.scheduler.max_num_seqs, streams)
    cfg.scheduler.max_num_batched_tokens = max(cfg.scheduler.max_num_batched_tokens, 32 * streams)
    cfg.lora.enabled = store is not None
    cfg.lora.adapters_dir = str(store) if store is not None else None
    return LLMEngine(cfg, model, detokenize=False)  # detokenisation runs in the server process


def timers_for(engine) -> dict[str, tuple[object, str]]:
    runner = engine.runner
    targets = {"step": (engine, "step"), "schedule": (engine.scheduler, "schedule"),
               "execute": (runner, "execute"), "forward": (runner.model, "forward"),
               "sample": (runner.sampler, "sample")}
    if runner.graphs is not None:
        targets["replay"] = (runner.graphs, "replay")
    return targets


def run(engine, streams: int, tokens: int, adapters: list[str]) -> dict[str, float]:
    """One batch of `streams` requests to the end; microseconds per decode step by part."""
    from server.engine.request import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    got: dict[str, int] = {}
    for i in range(streams):
        rid = f"s{time.monotonic_ns()}-{i}"
        got[rid] = 0
        engine.add_request(GenerationRequest(rid, list(range(2, 18)), params,
                                             adapter=adapters[i % len(adapters)] if adapters else None))
    while engine.idle or not any(got.values()):  # until the prefill step ran (adapters loaded)
        for o in engine.step():
            got[o.request_id] += len(o.token_ids)
        time.sleep(0.001 if engine.idle else 0)
    timers = Timers()
    steps = 0
    with timers.patched(timers_for(engine)):
        while engine.has_unfinished():
            for o in engine.step():
                got[o.request_id] += len(o.token_ids)
            steps += 1
    short = [n for n in got.values() if n != tokens]
    if short:
        raise AssertionError(f"{len(short)} of {streams} requests returned other than {tokens} tokens")
    s = {k: v / steps * 1e6 for k, v in timers.seconds.items()}
    s["forward"] = s.get("forward", 0.0) + s.get("replay", 0.0)
    return {"schedule": s["schedule"], "prepare": s["execute"] - s["forward"] - s["sample"],
            "forward": s["forward"], "sample": s["sample"],
            "outputs": s["step"] - s["execute"] - s["schedule"], "step": s["step"], "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters of the LoRA rows (0: base only)")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; the median step is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, {os.cpu_count()} cores, AVX512-BF16/AMX "
          f"{torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()}, "
          f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}")
    print(f"{'rows':>8} {'streams':>7} | " + " ".join(f"{k:>9}" for k in PARTS)
          + " |  step us | host/forward | host us per stream")
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "model")
        store = Path(tmp) / "adapters"
        names = make_store(model, store, args.adapters) if args.adapters else []
        for label, lora in (("base", False), (f"{args.adapters} lora", bool(names))):
            if label != "base" and not lora:
                continue
            for streams in args.streams:
                engine = make_engine(model, store if lora else None, streams, args.device)
                rows = sorted((run(engine, streams, args.tokens, names if lora else [])
                               for _ in range(args.repeats)), key=lambda r: r["step"])
                r = rows[len(rows) // 2]
                host = r["step"] - r["forward"]
                print(f"{label:>8} {streams:7d} | " + " ".join(f"{r[k]:9.0f}" for k in PARTS)
                      + f" | {r['step']:8.0f} | {host / r['forward']:12.2f} | {host / streams:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
