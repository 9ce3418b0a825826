"""Benchmark the segmented LoRA ops (shrink + expand) against the per-segment loop baseline.

  python loadtest/bench_kernels.py --device cpu  [--threads 1] [--quick]
  python loadtest/bench_kernels.py --device cuda [--models small,big] [--out DIR]
  python loadtest/bench_kernels.py --device cuda --sweep   # launch-config sweep (tuning)

Each row is one LoRA-targeted linear at one batch shape: T LoRA tokens split evenly over S
distinct adapter slots (a pool of max(S, 8) slots; S = T means pure decode), every adapter at
rank R. Printed: time of each candidate, the per-segment loop baseline, baseline/candidate
ratios, and the base GEMM x @ W^T of the same layer so LoRA overhead reads as a fraction.
CUDA rows also give the Triton path's effective bandwidth: the bytes it must move (x, the
active slots' A and B at their rank, y read + written) over its time, vs a 3 TB/s floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import LoraSegments, add_lora, torch_ops  # noqa: E402

MODELS = {
    "small": dict(hidden=576, q=576, kv=192, inter=1536),     # SmolLM2-135M
    "big": dict(hidden=4096, q=4096, kv=1024, inter=11008),   # Llama-2-7B-like
}
LAYERS = ("qkv", "o", "gate_up", "down")
HBM_FLOOR = 3.0e12  # bytes/s, H100 device-to-device copy measured in this workplace


def layer_dims(m: dict, layer: str) -> tuple[int, list[int]]:
    return {"qkv": (m["hidden"], [m["q"], m["kv"], m["kv"]]), "o": (m["q"], [m["hidden"]]),
            "gate_up": (m["hidden"], [m["inter"]] * 2), "down": (m["inter"], [m["hidden"]])}[layer]


def make_layer(m, layer, T, S, R, dtype, device, seed=0, pool: int = 0):
    """pool: slots in the pool (default max(S, 8)); the S active ones are spread at random."""
    in_dim, widths = layer_dims(m, layer)
    g = torch.Generator().manual_seed(seed)
    n_pool = max(S, pool or 8)
    slots = sorted(torch.randperm(n_pool, generator=g)[:S].tolist())
    lens = [T // S + (1 if i < T % S else 0) for i in range(S)]
    seg = LoraSegments.build(lens, slots, [R] * S, n_pool, device)
    offs = [0]
    for w in widths:
        offs.append(offs[-1] + w)
    gd = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gd, device=device).to(dtype)  # noqa: E731
    x = rnd(T, in_dim)
    a = rnd(n_pool, len(widths) * R, in_dim) / in_dim ** 0.5
    b = rnd(n_pool, offs[-1], R) / R ** 0.5
    w_base = rnd(offs[-1], in_dim) / in_dim ** 0.5
    y = rnd(T, offs[-1])
    return seg, x, a, b, y, w_base, tuple(offs)


def lora_bytes(seg, x, a, b, y, r_true: int, n_slices: int) -> int:
    esz_x, esz_w = x.element_size(), a.element_size()
    nt, in_dim, out = seg.num_tokens, x.shape[1], y.shape[1]
    return (nt * in_dim * esz_x + seg.num_segments * n_slices * r_true * in_dim * esz_w
            + seg.num_segments * out * r_true * esz_w + 2 * nt * out * esz_x)


def loop_baseline(y, x, a, b, seg, offs):
    """The obvious eager version: per segment, per slice, in the model dtype."""
    r = b.shape[2]
    for i in range(seg.num_segments):
        s, e, slot = seg.seg_starts[i], seg.seg_starts[i + 1], seg.seg_slots[i]
        h = x[s:e] @ a[slot].T
        for j in range(len(offs) - 1):
            y[s:e, offs[j]:offs[j + 1]] += h[:, j * r:(j + 1) * r] @ b[slot, offs[j]:offs[j + 1]].T


def gather_bmm(y, x, a, b, seg, offs):
    torch_ops.gather_expand(y, torch_ops.gather_shrink(x, a, seg), b, seg, offs)


def old_dispatch(y, x, a, b, seg, offs):
    """add_lora's CPU dispatch before the many-adapters change: padded bmm over the pool window
    when that layout at most doubles the rows, else grouped_mm (its table: `oseg`)."""
    if seg.pad_rows is not None and seg.num_segments > 1:
        torch_ops.padded_expand(y, torch_ops.padded_shrink(x, a, seg), b, seg, offs)
    else:
        torch_ops.grouped_expand(y, torch_ops.grouped_shrink(x, a, seg), b, seg, offs)


def cpu_time(fn, min_s=0.1, max_reps=100) -> float:
    """Median seconds of fn() after warm-up, on this thread's CPU clock: the cores are shared
    with other jobs, and wall time mostly measured how long we sat descheduled (medians 3x the
    minimum), while thread time stayed within ~20% of it. Needs torch threads = 1."""
    for _ in range(2):
        fn()
    t0 = time.thread_time()
    fn()
    one = time.thread_time() - t0
    reps = int(max(5, min(max_reps, min_s / max(one, 1e-7))))
    ts = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return statistics.median(ts)


_FLUSH: list = []


def gpu_time(fn, reps: int = 30) -> float:
    """Median device microseconds of fn(), replayed from a CUDA graph between CUDA events,
    with L2 flushed (256 MB write) before each replay. Eager launches on the device machine
    cost ~20-100 us of host time each, more than the kernels, so eager event timing measured
    the host; the graph removes it (host cost is reported separately)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton compiles) off the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for s, e in ev:
        _FLUSH[0].zero_()
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) for s, e in ev) * 1e3


def host_time(fn, calls: int = 50) -> float:
    """Wall microseconds per eager fn() call, back to back (host launch cost when it exceeds
    the device time)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def run_cpu(args) -> list[str]:
    torch.set_num_threads(args.threads)
    m = MODELS["small"]
    rows = []
    plan = []
    counts = [int(c) for c in args.adapters.split(",")]
    layers = args.layers.split(",")
    for R in args.ranks:
        for layer in (layers if R == 16 else [lay for lay in layers if lay in ("qkv", "down")]):
            for T in ((32, 128, 512) if not args.quick else (128,)) if not args.tokens else args.tokens:
                for S in counts:
                    if S <= T or args.tokens:
                        plan.append((layer, R, max(T, S), S))
    hdr = (f"{'layer':8} {'R':>3} {'T':>4} {'S':>3} | {'loop':>9} {'before':>9} {'torch':>9} {'padded':>9} "
           f"{'grouped':>9} | {'bef/torch':>9} {'grp/pad':>7} | {'base':>8} {'before/base':>11} {'lora/base':>9}")
    print(f"CPU, fp32, torch {torch.__version__}, threads={args.threads}; times in us "
          f"(median thread CPU time); pool {args.pool or 'max(S, 8)'} slots; torch = add_lora's CPU "
          "dispatch, before = the dispatch before the many-adapters change")
    print(hdr)
    rows.append(hdr)
    for layer, R, T, S in plan:
        seg, x, a, b, y, w, offs = make_layer(m, layer, T, S, R, torch.float32, "cpu", pool=args.pool)
        lens = [e - s for s, e in zip(seg.seg_starts, seg.seg_starts[1:])]
        # the same table with the padded layout always built, to time that path on every shape
        pseg = LoraSegments.build(lens, seg.seg_slots, seg.seg_ranks, seg.num_slots, "cpu",
                                  max_padding=float("inf"))
        # ... and as it was built before the change (window padding at most 2x)
        oseg = LoraSegments.build(lens, seg.seg_slots, seg.seg_ranks, seg.num_slots, "cpu",
                                  layouts=("torch",), window_only=True)
        t = {
            "loop": cpu_time(lambda: loop_baseline(y, x, a, b, seg, offs)) if S <= 64 else float("nan"),
            "before": cpu_time(lambda: old_dispatch(y, x, a, b, oseg, offs)),
            "torch": cpu_time(lambda: add_lora(y, x, a, b, seg, offs, backend="torch")),
            "padded": cpu_time(lambda: torch_ops.padded_expand(y, torch_ops.padded_shrink(x, a, pseg), b, pseg, offs)),
            "grouped": cpu_time(lambda: torch_ops.grouped_expand(y, torch_ops.grouped_shrink(x, a, seg), b, seg, offs)),
            "base": cpu_time(lambda: x @ w.T),
        }
        us = {k: v * 1e6 for k, v in t.items()}
        row = (f"{layer:8} {R:3d} {T:4d} {S:3d} | {us['loop']:9.1f} {us['before']:9.1f} {us['torch']:9.1f} "
               f"{us['padded']:9.1f} {us['grouped']:9.1f} | {t['before'] / t['torch']:9.2f} "
               f"{t['grouped'] / t['padded']:7.2f} | {us['base']:8.1f} {t['before'] / t['base']:11.2f} "
               f"{t['torch'] / t['base']:9.2f}")
        print(row, flush=True)
        rows.append(row)
    return rows


def run_cuda(args) -> list[str]:
    from kernels import triton_sgmv
    dev = "cuda"
    bench = lambda fn: gpu_time(fn, args.reps)  # noqa: E731
    rows = []
    hdr = (f"{'model':5} {'layer':7} {'R':>3} {'T':>5} {'S':>3} | {'triton':>8} {'shrink':>7} "
           f"{'expand':>7} {'GB/s':>6} {'%floor':>6} | {'loop':>8} {'gather':>8} "
           f"{'loop/tri':>8} {'gath/tri':>8} | {'base':>7} {'lora/base':>9} | {'host':>6}")
    print(f"CUDA {torch.cuda.get_device_name()}, bf16, torch {torch.__version__}; times in us "
          "(CUDA-graph replay, median of CUDA events, L2 flushed); host = eager wall us per add_lora "
          "call, back-to-back")
    print(hdr, flush=True)
    rows.append(hdr)
    for mname in args.models.split(","):
        m = MODELS[mname]
        for layer in LAYERS:
            for R in (16, 64):
                for T in (64, 256, 1024, 4096):
                    for S in (1, 8, 32, 64):
                        seg, x, a, b, y, w, offs = make_layer(m, layer, T, S, R, torch.bfloat16, dev)
                        n_sl = len(offs) - 1
                        tri = bench(lambda: add_lora(y, x, a, b, seg, offs))
                        h = triton_sgmv.sgmv_shrink(x, a, seg, n_sl)
                        t_sh = bench(lambda: triton_sgmv.sgmv_shrink(x, a, seg, n_sl))
                        t_ex = bench(lambda: triton_sgmv.sgmv_expand(y, h, b, seg, offs))
                        loop = bench(lambda: loop_baseline(y, x, a, b, seg, offs))
                        gathered = T * (a.shape[1] * a.shape[2] + b.shape[1] * b.shape[2]) * 2
                        gath = (bench(lambda: gather_bmm(y, x, a, b, seg, offs))
                                if gathered < 3e9 else float("nan"))
                        base = bench(lambda: x @ w.T)
                        nbytes = lora_bytes(seg, x, a, b, y, R, n_sl)
                        gbs = nbytes / (tri * 1e-6) / 1e9
                        host = host_time(lambda: add_lora(y, x, a, b, seg, offs))
                        row = (f"{mname:5} {layer:7} {R:3d} {T:5d} {S:3d} | {tri:8.1f} {t_sh:7.1f} "
                               f"{t_ex:7.1f} {gbs:6.0f} {100 * gbs * 1e9 / HBM_FLOOR:5.0f}% | "
                               f"{loop:8.1f} {gath:8.1f} {loop / tri:8.1f} {gath / tri:8.1f} | "
                               f"{base:7.1f} {tri / base:9.2f} | {host:6.1f}")
                        print(row, flush=True)
                        rows.append(row)
    return rows


def run_sweep(args) -> list[str]:
    """Time shrink and expand over a grid of launch configs at a few shapes; print the best
    next to the built-in heuristic (used to tune triton_sgmv.shrink_config/expand_config)."""
    import triton

    from kernels import triton_sgmv
    bench = lambda fn: gpu_time(fn, 15)  # noqa: E731
    shapes = [(mn, ly, R, T, S) for mn, ly in (("big", "qkv"), ("big", "down"), ("big", "gate_up"))
              for R in (16, 64) for T, S in ((64, 64), (1024, 32), (4096, 1), (4096, 64))]
    shapes += [("small", "qkv", 16, T, S) for T, S in ((64, 64), (1024, 32), (4096, 1), (4096, 64))]
    rows = []
    for mn, ly, R, T, S in shapes:
        seg, x, a, b, y, w, offs = make_layer(MODELS[mn], ly, T, S, R, torch.bfloat16, "cuda")
        n_sl, nr, k = len(offs) - 1, a.shape[1], a.shape[2]
        h = triton_sgmv.sgmv_shrink(x, a, seg, n_sl)
        t_def_s = bench(lambda: triton_sgmv.sgmv_shrink(x, a, seg, n_sl))
        t_def_e = bench(lambda: triton_sgmv.sgmv_expand(y, h, b, seg, offs))
        best_s, best_e = (t_def_s, "heuristic"), (t_def_e, "heuristic")
        bn = min(64, triton.next_power_of_2(max(16, nr)))
        for bm in (16, 32, 64):
            for bk in (64, 128):
                for split in (1, 2, 4, 8, 16):
                    if k // split < bk:
                        continue
                    for nw, ns in ((4, 3), (4, 5)):
                        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                                   num_warps=nw, num_stages=ns)
                        t = bench(lambda: triton_sgmv.sgmv_shrink(x, a, seg, n_sl, config=cfg))
                        best_s = min(best_s, (t, str(cfg)))
        for bm in (16, 32, 64, 128):
            for bn in (64, 128, 256):
                for nw, ns in ((4, 2), (8, 3)):
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(R, 32), num_warps=nw,
                               num_stages=ns)
                    t = bench(lambda: triton_sgmv.sgmv_expand(y, h, b, seg, offs, config=cfg))
                    best_e = min(best_e, (t, str(cfg)))
        hs = triton_sgmv.shrink_config(seg, k, nr, 2)
        he = triton_sgmv.expand_config(seg, R, [offs[i + 1] - offs[i] for i in range(n_sl)])
        print(f"  heuristics: shrink {hs} expand {he}")
        row = (f"{mn:5} {ly:7} R={R:2d} T={T:4d} S={S:2d} | shrink heur {t_def_s:7.1f} best "
               f"{best_s[0]:7.1f} {best_s[1]} | expand heur {t_def_e:7.1f} best {best_e[0]:7.1f} "
               f"{best_e[1]}")
        print(row, flush=True)
        rows.append(row)
    return rows


def run_host(args) -> list[str]:
    """Where the eager host time of one add_lora goes (device machine CPU)."""
    import triton
    import triton.language as tl

    from kernels import triton_sgmv

    @triton.jit
    def _empty(p, n, B: tl.constexpr):
        tl.store(p + tl.arange(0, B), tl.zeros((B,), tl.float32), mask=tl.arange(0, B) < n)

    seg, x, a, b, y, w, offs = make_layer(MODELS["big"], "qkv", 64, 64, 16, torch.bfloat16, "cuda")
    buf = torch.empty(16, device="cuda")
    h = triton_sgmv.sgmv_shrink(x, a, seg, 3)
    rows = [f"{name:28} {host_time(fn, 200):8.1f} us" for name, fn in (
        ("torch add_ (1 op)", lambda: buf.add_(1.0)),
        ("x @ W^T", lambda: x @ w.T),
        ("empty triton kernel", lambda: _empty[(1,)](buf, 16, B=16)),
        ("shrink_config (host math)", lambda: triton_sgmv.shrink_config(seg, 4096, 48, 2)),
        ("sgmv_shrink", lambda: triton_sgmv.sgmv_shrink(x, a, seg, 3)),
        ("sgmv_expand", lambda: triton_sgmv.sgmv_expand(y, h, b, seg, offs)),
        ("add_lora", lambda: add_lora(y, x, a, b, seg, offs)),
        ("LoraSegments.build (T=64,S=64)", lambda: LoraSegments.build(
            [1] * 64, list(range(64)), [16] * 64, 64, "cuda")),
    )]
    print("\n".join(rows))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (2 shared cores here)")
    p.add_argument("--quick", action="store_true", help="CPU: T=128 only")
    p.add_argument("--adapters", default="1,8,32,64", help="CPU: distinct adapters per call (S), comma separated")
    p.add_argument("--tokens", type=int, nargs="+", help="CPU: LoRA tokens per call (T; raised to S at least)")
    p.add_argument("--layers", default=",".join(LAYERS), help="CPU: layers, comma separated")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 8, 64], help="CPU: adapter ranks")
    p.add_argument("--pool", type=int, default=0, help="CPU: pool slots (default max(S, 8))")
    p.add_argument("--models", default="small,big")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--host", action="store_true", help="CUDA: eager host-cost breakdown")
    p.add_argument("--reps", type=int, default=30, help="CUDA: timed reps per point")
    p.add_argument("--out", default=os.environ.get("OUT"), help="write the table here too")
    args = p.parse_args()
    if args.sweep:
        rows, name = run_sweep(args), "sweep.txt"
    elif args.host:
        rows, name = run_host(args), "host.txt"
    elif args.device == "cpu":
        rows, name = run_cpu(args), "bench_cpu.txt"
    else:
        rows, name = run_cuda(args), "bench_cuda.txt"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / name).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
