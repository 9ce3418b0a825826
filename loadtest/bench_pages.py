"""What reading the adapter pool through its page table costs the Triton LoRA kernels (GPU).

One LoRA-targeted linear of the Llama-3.1-8B shape, bf16, T tokens over S rank-16 adapters, three
pools holding the same adapters, timed side by side in one run (CUDA-graph replay, L2 flushed):
  unpaged R=16   slots of rank 16: nothing to skip, no table (the floor)
  unpaged R=64   slots of rank 64 (--max-lora-rank 64 without pages): rows past 16 skipped
  paged u=16     pages of rank 16, R=64 (the triton backend's default at --max-lora-rank 64)
Printed: microseconds of add_lora for each, and paged / unpaged ratios. Every pool gives the same
y (checked before timing). First, what writing one adapter into the pool costs (a loader's
`write_in_place`: host -> device on the copy stream, waited for), unpaged (R=64) and in pages of
16, for adapters of rank 16 and 64 on every projection of the 8B shape: one copy per (module,
page), so a paged rank-64 adapter makes 4x the copies.

    python loadtest/bench_pages.py [--reps 10] [--out DIR]
    python loadtest/bench_pages.py --device cpu --writes-only   # the write timings on CPU
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

from kernels import LoraSegments, add_lora  # noqa: E402
from loadtest.bench_kernels import gpu_time  # noqa: E402
from loadtest.gpu_bench import LLAMA_8B as LLAMA_8B_CONFIG  # noqa: E402
from server.adapters.lora_weights import LoraAdapter, LoraModuleWeights  # noqa: E402
from server.adapters.slots import LoraSlots  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.model.arch import ModelArch  # noqa: E402

LAYERS = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
          "down": (14336, [4096])}
RANK, MAX_RANK, PAGE = 16, 64, 16


def pools(in_dim: int, widths: list[int], S: int, g: torch.Generator) -> dict:
    """The same S rank-16 adapters in three pools -> name: (a, b, pages or None)."""
    n, out = len(widths), sum(widths)
    a16 = torch.randn(S, n, RANK, in_dim, generator=g) / in_dim ** 0.5
    b16 = torch.randn(S, out, RANK, generator=g) / RANK ** 0.5
    a64 = torch.zeros(S, n, MAX_RANK, in_dim)
    a64[:, :, :RANK] = a16
    b64 = torch.zeros(S, out, MAX_RANK)
    b64[:, :, :RANK] = b16
    # pages: adapter s in page P - 1 - s (not its slot: the table is really read), the rest 0
    pages = torch.zeros(S, MAX_RANK // PAGE, dtype=torch.int32)
    pages[:, 0] = torch.arange(S - 1, -1, -1, dtype=torch.int32)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    return {"unpaged R=16": (a16.reshape(S, n * RANK, in_dim).to(**dev), b16.to(**dev), None),
            "unpaged R=64": (a64.reshape(S, n * MAX_RANK, in_dim).to(**dev), b64.to(**dev), None),
            "paged u=16": (a16.flip(0).reshape(S, n * PAGE, in_dim).to(**dev), b16.flip(0).to(**dev),
                           pages.cuda())}


def random_adapter(arch: ModelArch, rank: int, g: torch.Generator) -> LoraAdapter:
    """Rank `rank` on every projection of every layer (float32 host tensors, as loaded)."""
    modules = {}
    for layer in range(arch.num_layers):
        for m in arch.lora_targets:
            n_in, n_out = arch.linear_shape(m)
            modules[(layer, m)] = LoraModuleWeights(torch.randn(rank, n_in, generator=g) / n_in ** 0.5,
                                                    torch.randn(n_out, rank, generator=g) / rank ** 0.5,
                                                    1.0, torch.zeros(n_in))
    n = sum(w.a.numel() + w.b.numel() for w in modules.values())
    return LoraAdapter(modules, tuple(arch.lora_targets), rank, n, 4 * n)


def write_rows(device: torch.device, reps: int) -> list[str]:
    """Median seconds of a loader's write of one adapter, unpaged vs paged, ranks 16 and 64."""
    arch = ModelArch.from_hf_config(dict(LLAMA_8B_CONFIG, architectures=["LlamaForCausalLM"], model_type="llama"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    adapters = {r: random_adapter(arch, r, g) for r in (RANK, MAX_RANK)}
    rows = [f"one adapter written into the pool ({device.type}, {dtype}, every projection, 8B shape): "
            "median ms of write_in_place", f"{'adapter rank':>12} | {'unpaged R=64':>12} {'paged u=16':>12} | paged/unpaged"]
    pools = {u: LoraSlots(arch, 2, MAX_RANK, dtype, device, Metrics(), page_rank=u) for u in (MAX_RANK, PAGE)}
    for rank, adapter in adapters.items():
        times = []
        for u, slots in pools.items():
            took = []
            for i in range(reps + 1):  # the first one allocates and warms up
                slots.evict("w")
                t0 = time.perf_counter()
                assert slots.write_in_place("w", adapter)
                took.append(time.perf_counter() - t0)
            times.append(statistics.median(took[1:]) * 1e3)
        rows.append(f"{rank:12d} | {times[0]:12.1f} {times[1]:12.1f} | {times[1] / times[0]:.2f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    p.add_argument("--adapters", type=int, nargs="+", default=[8, 64])
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--writes-only", action="store_true")
    p.add_argument("--write-reps", type=int, default=3)
    args = p.parse_args()
    if args.writes_only:
        rows = write_rows(torch.device(args.device), args.write_reps)
        print("\n".join(rows))
        return
    rows = write_rows(torch.device("cuda"), args.write_reps)  # first: quick, and the section has a cap
    print("\n".join(rows), flush=True)
    names = ("unpaged R=16", "unpaged R=64", "paged u=16")
    head = (f"{'layer':7} {'T':>5} {'S':>3} | " + " ".join(f"{n:>12}" for n in names)
            + " | paged/R=64 paged/R=16")
    kernel_rows = [f"CUDA {torch.cuda.get_device_name()}, bf16, rank-{RANK} adapters, torch {torch.__version__}; "
                   "add_lora in us (CUDA-graph replay, median of CUDA events, L2 flushed)", head]
    print("\n".join(kernel_rows), flush=True)
    rows += kernel_rows
    g = torch.Generator().manual_seed(0)
    for layer, (in_dim, widths) in LAYERS.items():
        offs = [0]
        for w in widths:
            offs.append(offs[-1] + w)
        for S in args.adapters:
            ps = pools(in_dim, widths, S, g)
            for T in args.tokens:
                T = max(T, S)
                lens = [T // S + (1 if i < T % S else 0) for i in range(S)]
                seg = LoraSegments.build(lens, list(range(S)), [RANK] * S, S, "cuda", layouts=("triton",))
                x = (torch.randn(T, in_dim, generator=g) / 2).to("cuda", torch.bfloat16)
                y0 = torch.randn(T, offs[-1], generator=g).to("cuda", torch.bfloat16)
                times, ys = [], []
                for name in names:
                    a, b, pages = ps[name]
                    y = y0.clone()
                    add_lora(y, x, a, b, seg, offs, backend="triton", pages=pages)
                    ys.append(y.float())
                    times.append(gpu_time(lambda: add_lora(y, x, a, b, seg, offs, backend="triton", pages=pages),
                                          args.reps))
                for name, y in zip(names[1:], ys[1:]):  # the same adapters: the same y, up to rounding
                    err = (y - ys[0]).abs().max().item()
                    assert err <= 0.05 * ys[0].abs().max().item(), (layer, T, S, name, err)
                row = (f"{layer:7} {T:5d} {S:3d} | " + " ".join(f"{t:12.1f}" for t in times)
                       + f" | {times[2] / times[1]:10.2f} {times[2] / times[0]:10.2f}")
                print(row, flush=True)
                rows.append(row)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_pages.txt").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
