"""Benchmark paged attention backends on the default model's attention shapes.

    .venv/bin/python loadtest/bench_attention.py [--repeats 7] [--dtype float32|bfloat16]
    .venv/bin/python loadtest/bench_attention.py --backend triton [--out FILE]   # CUDA only

--backend triton: the Triton kernel (kernels/triton_paged_attention.py) against the torch SDPA
gather path on one GPU, Llama-3.1-8B attention shapes (see run_gpu).

Decode: B sequences x ctx positions, one query token each; prefill: one sequence, 512 new tokens
over ctx 512. Each "step" runs all layers, each layer with its own cache tensor (as in the
engine), so K/V come from DRAM, not from the last layer's L3. The floor is the time to read the
K/V bytes the step needs once, at the memory bandwidth measured in the same run:
  copy floor = bytes / (2 * copy_bytes / copy_time)  (copy moves read + write bytes)
  read floor = bytes / (read_bytes / sum_time)        (pure streaming read, usually faster)
The machine may be shared: every figure is the median (and the min, the best estimate of an
idle machine) of --repeats rounds, backends interleaved inside each round so drifting load hits
them alike. On an oversubscribed machine every OpenMP parallel region (this op's one, and the
many of the torch path) can wait a scheduler slice for a descheduled worker: compare
--threads 1 runs there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import paged_attention as pa  # noqa: E402

H, KVH, D, LAYERS = 9, 3, 64, 30  # SmolLM2-135M


def measure_bandwidth(repeats: int, nbytes: int = 1 << 29) -> tuple[float, float]:
    """(copy GB/s counting read + write, read GB/s) on nbytes tensors, medians."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(repeats):
        t0 = time.perf_counter(); dst.copy_(src); copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); src.sum(); read.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(copy) / 1e9, nbytes / statistics.median(read) / 1e9


def make_case(caches, B, ctx, block_size, n_new, dtype):
    """Block tables with shuffled block ids, and the query tokens of one step."""
    per_seq = -(-ctx // block_size)
    n_blocks = caches[0].shape[0] // block_size
    ids = torch.randperm(n_blocks)[: B * per_seq].to(torch.int32).view(B, per_seq)
    if n_new == 1:  # decode: one token per sequence at position ctx - 1
        seq = torch.arange(B, dtype=torch.int32)
        tctx = torch.full((B,), ctx, dtype=torch.int32)
    else:  # prefill chunk of sequence 0: positions ctx - n_new .. ctx - 1
        seq = torch.zeros(n_new, dtype=torch.int32)
        tctx = torch.arange(ctx - n_new + 1, ctx + 1, dtype=torch.int32)
    qs = [torch.randn(seq.numel(), H, D).to(dtype) for _ in caches]
    kv_bytes = B * ctx * 2 * KVH * D * caches[0].element_size()
    return ids, seq, tctx, qs, kv_bytes


def time_step(backend, caches, ids, seq, tctx, qs, block_size, outs):
    t0 = time.perf_counter()
    for layer, cache in enumerate(caches):
        pa.paged_attention(qs[layer], cache, ids, seq, tctx, block_size, D ** -0.5, out=outs[layer], backend=backend)
    return time.perf_counter() - t0


# Llama-3.1-8B attention, bf16, block 16: (name, decode sequences, their context, prefill chunk
# tokens, that chunk's context). Mixed = decodes first, then one chunked prefill (vLLM's order).
GPU_SHAPE = dict(H=32, KVH=8, D=128, block_size=16)
GPU_CASES = [(f"decode B={b} ctx={c}", b, c, 0, 0) for b in (1, 8, 64, 256) for c in (512, 2048, 8192)
             if b * c <= 256 * 2048] + [
    ("prefill 2048 tok ctx=2048", 0, 0, 2048, 2048),
    ("mixed 64 dec ctx=2048 + 512 chunk ctx=1024", 64, 2048, 512, 1024),
]


def run_gpu(repeats: int = 20, cases=GPU_CASES, layers: int = 4) -> list[str]:
    """Triton kernel vs the torch gather + SDPA path on CUDA; returns the table's lines.

    triton us: device time per layer, replayed from a CUDA graph with L2 flushed (the way the
    engine's decode graphs will run it); triton eager: wall time per eager call (host launch cost
    included); torch us: the gather path eagerly (its host synchronisations make it uncapturable),
    L2 flushed. tok/s = query tokens / triton device time (one layer). floor = K/V bytes read once
    over the device copy bandwidth measured here (meaningless for the compute-bound prefill rows).
    Raises RuntimeError without CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("--backend triton benchmarks a CUDA GPU; torch.cuda.is_available() is False here")
    from kernels.triton_paged_attention import paged_attention_triton, query_tiles, tile_tokens
    from loadtest.bench_kernels import _FLUSH, gpu_time, host_time

    dev = torch.device("cuda")
    H, KVH, D, bs = GPU_SHAPE["H"], GPU_SHAPE["KVH"], GPU_SHAPE["D"], GPU_SHAPE["block_size"]
    dtype = torch.bfloat16
    src = torch.empty(1 << 30, dtype=torch.int8, device=dev)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (gpu_time(lambda: dst.copy_(src), reps=repeats) * 1e-6)  # read + write bytes/s
    del src, dst
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s "
             f"(read+write); H={H} KVH={KVH} D={D} bf16 block {bs}; times in us per layer, {layers} layers' caches "
             f"rotated, medians of {repeats}",
             f"{'case':<44}{'KV MB':>8}{'floor':>8}{'triton':>9}{'eager':>9}{'torch':>9}{'tok/s':>11}"
             f"{'tri/floor':>10}{'torch/tri':>10}"]
    print("\n".join(lines), flush=True)
    for name, n_dec, dec_ctx, n_pre, pre_ctx in cases:
        seqs = [(dec_ctx, 1)] * n_dec + ([(pre_ctx, n_pre)] if n_pre else [])
        need = [-(-c // bs) for c, _ in seqs]
        n_blocks = sum(need)
        ids = torch.randperm(n_blocks, device=dev).to(torch.int32)
        bt = torch.zeros(len(seqs), max(need), dtype=torch.int32, device=dev)
        seq, ctx, used = [], [], 0
        for b, (c, n) in enumerate(seqs):
            bt[b, :need[b]] = ids[used:used + need[b]]
            used += need[b]
            seq += [b] * n
            ctx += list(range(c - n + 1, c + 1))
        seq = torch.tensor(seq, dtype=torch.int32, device=dev)
        ctx = torch.tensor(ctx, dtype=torch.int32, device=dev)
        T = seq.numel()
        caches = [torch.randn(n_blocks * bs, 2, KVH, D, device=dev, dtype=dtype) for _ in range(layers)]
        qs = [torch.randn(T, H, D, device=dev, dtype=dtype) for _ in range(layers)]
        outs = [torch.empty_like(q) for q in qs]
        max_q = max(n for _, n in seqs)
        tiles = query_tiles([n for _, n in seqs], tile_tokens(H, KVH, max_q), dev) if max_q > 1 else None
        kw = dict(max_context_len=max(c for c, _ in seqs), max_query_len=max_q, tiles=tiles)
        scale = D ** -0.5

        def triton_step():
            for q, cache, o in zip(qs, caches, outs):
                paged_attention_triton(q, cache, bt, seq, ctx, bs, scale, o, **kw)

        def torch_step():
            for q, cache, o in zip(qs, caches, outs):
                pa.paged_attention(q, cache, bt, seq, ctx, bs, scale, out=o, backend="torch")

        triton_step()
        ref = outs[0].float().clone()
        torch_step()
        err = (outs[0].float() - ref).abs().max().item()
        assert err < 5e-2, f"{name}: triton and torch paths differ by {err:.3g}"
        t_tri = gpu_time(triton_step, reps=repeats) / layers
        t_eager = host_time(triton_step, calls=repeats) / layers
        ev = []
        for _ in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _FLUSH[0].zero_()
            s.record()
            torch_step()
            e.record()
            ev.append((s, e))
        torch.cuda.synchronize()
        t_torch = statistics.median(s.elapsed_time(e) for s, e in ev) * 1e3 / layers
        kv_bytes = sum(c for c, _ in seqs) * 2 * KVH * D * 2
        floor = kv_bytes / bw * 1e6  # bw counts read + write bytes: reading kv_bytes moves kv_bytes
        lines.append(f"{name:<44}{kv_bytes / 1e6:>8.1f}{floor:>8.1f}{t_tri:>9.1f}{t_eager:>9.1f}{t_torch:>9.1f}"
                     f"{T / (t_tri * 1e-6):>11.3g}{t_tri / floor:>10.2f}{t_torch / t_tri:>10.1f}")
        print(lines[-1], flush=True)
        del caches, qs, outs
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cpu", choices=["cpu", "triton"],
                    help="cpu: the CPU backends below; triton: the Triton kernel vs torch on CUDA")
    ap.add_argument("--out", help="--backend triton: also write the table to this file")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--backends", default="cpp,torch")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = ap.parse_args()
    if args.backend == "triton":
        if not torch.cuda.is_available():
            sys.exit("bench_attention.py --backend triton needs a CUDA GPU (torch.cuda.is_available() is False)")
        lines = run_gpu(repeats=max(args.repeats, 10))
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    backends = args.backends.split(",")
    t0 = time.perf_counter()
    if "cpp" in backends and not pa.cpp_available():
        print(f"C++ extension unavailable ({pa.cpp_error()}); dropping cpp")
        backends.remove("cpp")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}; "
          f"extension load {time.perf_counter() - t0:.1f} s")
    copy_bw, read_bw = measure_bandwidth(max(args.repeats, 5))
    print(f"bandwidth: copy {copy_bw:.1f} GB/s (read+write), read {read_bw:.1f} GB/s")
    print(f"model: H={H} KVH={KVH} D={D}, {args.layers} layers, {args.dtype}, block_size {args.block_size}; "
          f"times in ms per layer over {args.repeats} steps of {args.layers} layers; ratios use the median "
          f"and the copy floor")

    cases = [(B, ctx, 1) for B in (1, 8, 32, 64) for ctx in (128, 256, 512)] + [(1, 512, 512)]
    max_slots = max(B * ctx for B, ctx, _ in cases) + 4 * args.block_size
    caches = [torch.randn(max_slots, 2, KVH, D).to(dtype) for _ in range(args.layers)]
    head = "".join(f"{b + ' med':>10}{b + ' min':>10}" for b in backends)
    ratios = "".join(f"{b + '/fl':>9}" for b in backends)
    print(f"\n{'case':<24}{'KV MB':>7}{'floor':>8}{'rdfloor':>8}{head}{ratios}{'cpp/fl min':>11}"
          + ("  torch/cpp" if backends == ["cpp", "torch"] else ""))
    for B, ctx, n_new in cases:
        ids, seq, tctx, qs, kv_bytes = make_case(caches, B, ctx, args.block_size, n_new, dtype)
        outs = [torch.empty_like(q) for q in qs]
        times = {b: [] for b in backends}
        for b in backends:  # warm-up: allocator, first-touch, extension load
            time_step(b, caches, ids, seq, tctx, qs, args.block_size, outs)
        for _ in range(args.repeats):
            for b in backends:
                times[b].append(time_step(b, caches, ids, seq, tctx, qs, args.block_size, outs) / args.layers)
        med = {b: statistics.median(v) * 1e3 for b, v in times.items()}
        best = {b: min(v) * 1e3 for b, v in times.items()}
        floor, rfloor = kv_bytes / copy_bw / 1e6, kv_bytes / read_bw / 1e6
        name = f"decode B={B} ctx={ctx}" if n_new == 1 else f"prefill {n_new} tok ctx={ctx}"
        line = f"{name:<24}{kv_bytes / 1e6:>7.2f}{floor:>8.3f}{rfloor:>8.3f}"
        line += "".join(f"{med[b]:>10.3f}{best[b]:>10.3f}" for b in backends)
        line += "".join(f"{med[b] / floor:>9.2f}" for b in backends)
        line += f"{best['cpp'] / floor:>11.2f}" if "cpp" in backends else f"{'':>11}"
        if backends == ["cpp", "torch"]:
            line += f"{med['torch'] / med['cpp']:>11.1f}"
        print(line, flush=True)

if __name__ == "__main__":
    main()
