"""Multi-LoRA decode throughput: this engine vs itself with LoRA off vs PEFT's mixed-adapter
batching (`generate(..., adapter_names=[...])`), same prompts, same rank-16 adapters on all
seven projections, in one process.

Decode throughput is B * (N - 1) / (time for N new tokens - time for 1), for every system.
The table also prints the adapter bytes one step reads (distinct adapters x adapter size)
beside the base weight bytes, which is what makes many distinct adapters expensive.

    python loadtest/bench_lora.py --streams 32 64 --adapters 1 8 32 64 --new-tokens 32 --repeats 3

This machine is shared and noisy: each comparison runs its two sides alternately --repeats
times and reports the medians (and the median of the per-pair ratios). Every run is checked to
return exactly the tokens it asked for, from every system.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from server.config import Config
from server.engine.device import resolve_device, resolve_dtype
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root
from loadtest.closed_loop import step_to_end  # noqa: E402

RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, out: Path, count: int, rank: int) -> dict[str, Path]:
    """`count` PEFT adapters (random A, small random B), saved by PEFT itself."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                    lora_dropout=0.0))
    paths = {}
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.02)
        paths[f"bench-{i}"] = out / f"bench-{i}"
        pm.save_pretrained(paths[f"bench-{i}"])
    return paths


def engine_for(model_dir: Path, adapters: dict[str, Path] | None, slots: int, lora_dtype: str = "auto",
               old_slots: int | None = None) -> LLMEngine:
    """`slots`: adapters the pool must hold. `old_slots`: the fixed design before the byte-sized
    pool instead: a pool of exactly that many slots and at most that many adapters per step."""
    cfg = Config()
    cfg.model.dtype = "auto"
    cfg.scheduler.max_num_seqs = 128
    cfg.scheduler.max_num_batched_tokens = 2048
    cfg.lora.enabled = adapters is not None
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {n: str(p) for n, p in (adapters or {}).items()}
    cfg.lora.max_cpu_loras = max(64, slots)
    # a pool that holds them all (slots are capped at max_cpu_loras; CPU pages are taken on use)
    cfg.lora.lora_pool_memory = 1 << 40
    if old_slots:
        from server.adapters.slots import LoraSlots
        from server.model.arch import ModelArch

        arch = ModelArch.from_dir(model_dir)
        dtype = (resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device)) if lora_dtype == "auto"
                 else getattr(torch, lora_dtype))
        cfg.lora.lora_pool_memory = old_slots * LoraSlots.slot_nbytes(arch, RANK, dtype)
        cfg.lora.max_loras = old_slots
    cfg.lora.lora_dtype = lora_dtype
    cfg.lora.max_lora_rank = RANK
    return LLMEngine(cfg, model_dir)


def prompts_for(engine: LLMEngine, n: int) -> list[list[int]]:
    tok = engine.tokenizer
    return [tok.encode(tok.render_chat([{"role": "user", "content": f"Tell me about topic number {i}."}]),
                       add_special_tokens=False) for i in range(n)]


def engine_run(engine: LLMEngine, prompts, names, new: int) -> float:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    # Load every adapter into the host cache first: we time decode.
    held = [engine.adapters.acquire(n) for n in set(names) - {None}]
    while not all(engine.adapters.is_ready(ref) for ref in held):
        engine.adapters.prefetch(held, set(held))
        engine.step()
        time.sleep(0.01)
    for ref in held:
        engine.adapters.release(ref)
    t0 = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, names)):
        engine.add_request(GenerationRequest(f"x{time.monotonic_ns()}-{i}", p, params, adapter=n))
    step_to_end(engine, len(prompts), new)
    return time.perf_counter() - t0


def engine_tps(engine: LLMEngine, prompts, names, new: int) -> float:
    engine_run(engine, prompts[:2], names[:2], 2)  # warm the slots and caches
    return len(prompts) * (new - 1) / (engine_run(engine, prompts, names, new) - engine_run(engine, prompts, names, 1))


def paired(first, second, repeats: int) -> tuple[float, float, float]:
    """Alternate two measurements; medians of each and of their per-pair ratio second/first."""
    a, b = [], []
    for _ in range(repeats):
        a.append(first())
        b.append(second())
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b))


def peft_tps(peft_model, prompts, names, new: int, pad: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (ids != pad).long()
    for i, p in enumerate(prompts):
        mask[i, width - len(p):] = 1

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=pad, adapter_names=list(names))
        if out.shape != (len(prompts), width + n):
            raise RuntimeError(f"PEFT returned {tuple(out.shape)}, not {len(prompts)} x {width} + {n}")
        return time.perf_counter() - t0

    return len(prompts) * (new - 1) / (timed(new) - timed(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old-slots", type=int, default=0, help="also time the old fixed design: this many "
                    "slots, at most this many adapters per step (the `fixed` column)")
    ap.add_argument("--skip", default="", help="sections to skip, comma separated: base,dtype")
    ap.add_argument("--peft", type=str, default="32x8", help="(streams x adapters) cases to also run in PEFT, "
                    "comma separated, or 'none'")
    args = ap.parse_args()
    global RANK
    RANK = args.rank
    from server.model.default_model import ensure_default_model

    model_dir = ensure_default_model()
    n_max = max(args.adapters)
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    adapters = make_adapters(model_dir, tmp, n_max, args.rank)
    names_all = list(adapters)

    base = engine_for(model_dir, None, 1)
    lora = engine_for(model_dir, adapters, n_max)
    info = lora.info
    per_adapter = lora.adapters.slot_nbytes  # one slot, at rank --rank
    base_bytes = info.arch.weight_params() * torch.empty((), dtype=info.dtype).element_size()
    N = args.new_tokens
    print(f"model {info.model_name}  dtype {info.dtype}  adapters rank {args.rank} on 7 projections "
          f"({per_adapter / 2**20:.1f} MiB each at the slot dtype)  threads {torch.get_num_threads()}  new tokens {N}")

    skip = set(args.skip.split(","))
    print("\nbase-only requests: LoRA-enabled engine (adapters registered, slots allocated) vs --no-lora")
    for B in args.streams if "base" not in skip else ():
        p = prompts_for(base, B)
        off, on, ratio = paired(lambda: engine_tps(base, p, [None] * B, N),
                                lambda: engine_tps(lora, p, [None] * B, N), args.repeats)
        print(f"  {B:>3} streams: no-lora {off:7.1f} tok/s | lora-enabled {on:7.1f} tok/s | ratio {ratio:.3f}")

    peft_cases = set() if args.peft == "none" else {tuple(map(int, c.split("x"))) for c in args.peft.split(",")}
    peft_model = None
    if peft_cases:
        import peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=info.dtype)
        needed = max(a for _, a in peft_cases)
        peft_model = peft.PeftModel.from_pretrained(hf, adapters[names_all[0]], adapter_name=names_all[0])
        for name in names_all[1:needed]:
            peft_model.load_adapter(adapters[name], adapter_name=name)
        peft_model.eval()
    pad = info.arch.eos_token_ids[0] if info.arch.eos_token_ids else 0

    fixed = engine_for(model_dir, adapters, n_max, old_slots=args.old_slots) if args.old_slots else None
    print(f"\n{'streams':>7} {'adapters':>8} | {'engine':>8} | {'LoRA off':>8} | {'vs off':>6} | {'PEFT':>7} | "
          f"{'vs PEFT':>7} | {'fixed':>7} | {'adapter MiB/step':>16} | {'base MiB/step':>13}")
    for B in args.streams:
        prompts = prompts_for(lora, B)
        for k in args.adapters:
            names = [names_all[i % k] for i in range(B)]
            off, tps, ratio = paired(lambda: engine_tps(base, prompts, [None] * B, N),
                                     lambda: engine_tps(lora, prompts, names, N), args.repeats)
            peft_str, ratio_str, fixed_str = "-", "-", "-"
            if fixed is not None:
                fixed_str = f"{engine_tps(fixed, prompts, names, N):7.1f}"
            if (B, k) in peft_cases:
                ptps = peft_tps(peft_model, prompts, names, N, pad)
                peft_str, ratio_str = f"{ptps:7.1f}", f"{tps / ptps:6.1f}x"
            print(f"{B:>7} {k:>8} | {tps:8.1f} | {off:8.1f} | {ratio:6.2f} | {peft_str:>7} | {ratio_str:>7} | "
                  f"{fixed_str:>7} | "
                  f"{min(k, B) * per_adapter / 2**20:16.1f} | {base_bytes / 2**20:13.1f}", flush=True)

    if "dtype" in skip:
        return
    B, k = args.streams[0], min(8, n_max)
    print(f"\nadapter weight dtype ({B} streams over {k} adapters):")
    prompts = prompts_for(lora, B)
    names = [names_all[i % k] for i in range(B)]
    engines = {dt: engine_for(model_dir, {n: adapters[n] for n in names_all[:k]}, k, lora_dtype=dt)
               for dt in ("float32", "bfloat16")}
    fp32, bf16, ratio = paired(lambda: engine_tps(engines["float32"], prompts, names, N),
                               lambda: engine_tps(engines["bfloat16"], prompts, names, N), args.repeats)
    print(f"  float32 slots {fp32:7.1f} tok/s | bfloat16 slots {bf16:7.1f} tok/s | bf16/fp32 {ratio:.2f}")


if __name__ == "__main__":
    main()
