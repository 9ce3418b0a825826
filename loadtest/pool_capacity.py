"""How many adapters the device pool holds, unpaged and in rank-unit pages (no GPU needed).

The pool is sized by the server's own code (`LoraSlots.sized`, on the meta device: nothing is
allocated), for a model shape (default: Llama-3.1-8B in bf16), a pool size and --max-lora-rank;
each row is one page rank (the max rank itself: unpaged, the torch backend's pool; 16: the triton
backend's default). Adapters of rank r take ceil(r / page rank) pages each.

    python -m loadtest.pool_capacity --pool 2GiB --max-rank 64 --ranks 8 16 64
"""

from __future__ import annotations

import argparse

import torch

from loadtest.gpu_bench import LLAMA_8B
from server.adapters.slots import LoraSlots
from server.config import parse_bytes
from server.metrics import Metrics
from server.model.arch import ModelArch


def capacity(arch: ModelArch, pool: int, max_rank: int, page_rank: int, ranks: list[int],
             dtype: torch.dtype, max_slots: int) -> dict:
    s = LoraSlots.sized(arch, pool, max_rank, dtype, torch.device("meta"), Metrics(), max_slots=max_slots,
                        page_rank=page_rank)
    return {"page_rank": page_rank, "slots": s.num_slots, "pages": s.num_pages,
            "bytes": s.nbytes, **{r: min(s.num_slots, s.num_pages // s.pages_for(r)) for r in ranks}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=parse_bytes, default=parse_bytes("2GiB"))
    ap.add_argument("--max-rank", type=int, default=64)
    ap.add_argument("--page-ranks", type=int, nargs="+", default=None, help="default: max rank, then 16")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64], help="adapter ranks to count")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-slots", type=int, default=64, help="--max-cpu-loras")
    args = ap.parse_args()
    arch = ModelArch.from_hf_config(dict(LLAMA_8B, architectures=["LlamaForCausalLM"], model_type="llama"))
    page_ranks = args.page_ranks or [args.max_rank, 16]
    ranks = [r for r in args.ranks if r <= args.max_rank]
    print(f"Llama-3.1-8B shape, {args.dtype}, pool {args.pool / 2**30:.2f} GiB, --max-lora-rank {args.max_rank}, "
          f"--max-cpu-loras {args.max_slots}")
    print("| page rank | slots | pages | pool MiB | " + " | ".join(f"rank-{r} adapters" for r in ranks) + " |")
    print("| --- " * (4 + len(ranks)) + "|")
    rows = [capacity(arch, args.pool, args.max_rank, u, ranks, getattr(torch, args.dtype), args.max_slots)
            for u in page_ranks]
    for row in rows:
        label = f"{row['page_rank']}" + (" (unpaged)" if row["page_rank"] == args.max_rank else "")
        print(f"| {label} | {row['slots']} | {row['pages']} | {row['bytes'] / 2**20:.0f} | "
              + " | ".join(str(row[r]) for r in ranks) + " |")
    if len(rows) > 1:
        base = rows[0]
        print("ratio, last row / first: " + ", ".join(f"rank-{r} {rows[-1][r] / base[r]:.2f}x" for r in ranks))


if __name__ == "__main__":
    main()
