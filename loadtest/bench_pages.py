"""What reading the adapter pool through its page table costs the Triton LoRA kernels (GPU).

One LoRA-targeted linear of the Llama-3.1-8B shape, bf16, T tokens over S rank-16 adapters, three
pools holding the same adapters, timed side by side in one run (CUDA-graph replay, L2 flushed):
  unpaged R=16   slots of rank 16: nothing to skip, no table (the floor)
  unpaged R=64   slots of rank 64 (--max-lora-rank 64 without pages): rows past 16 skipped
  paged u=16     pages of rank 16, R=64 (the triton backend's default at --max-lora-rank 64)
Printed: microseconds of add_lora for each, and paged / unpaged ratios. Every pool gives the same
y (checked before timing).

    python loadtest/bench_pages.py [--reps 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import LoraSegments, add_lora  # noqa: E402
from loadtest.bench_kernels import gpu_time  # noqa: E402

LLAMA_8B = dict(hidden=4096, q=4096, kv=1024, inter=14336)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    p.add_argument("--adapters", type=int, nargs="+", default=[8, 64])
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    names = ("unpaged R=16", "unpaged R=64", "paged u=16")
    head = (f"{'layer':7} {'T':>5} {'S':>3} | " + " ".join(f"{n:>12}" for n in names)
            + " | paged/R=64 paged/R=16")
    rows = [f"CUDA {torch.cuda.get_device_name()}, bf16, rank-{RANK} adapters, torch {torch.__version__}; "
            "add_lora in us (CUDA-graph replay, median of CUDA events, L2 flushed)", head]
    print("\n".join(rows), flush=True)
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
