"""Random PEFT LoRA adapters for a model directory, written directly (no PEFT, no model load):
fast enough to fill a store with thousands. Each is a valid PEFT directory (adapter_config.json +
adapter_model.safetensors, PEFT's tensor names); `distinct` of them have their own random
weights, the others hard-link those files (same bytes, separate adapters to the server).

    python -m loadtest.random_adapters --model DIR --out STORE -n 1000 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.model.arch import ModelArch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_name(i: int) -> str:
    return f"lora-{i:05d}"


def write_adapter(model_dir: Path, out: Path, *, rank: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                  seed: int = 0, std: float = 0.05, dtype: torch.dtype = torch.float16) -> Path:
    """One random adapter of `rank` on `targets` of every layer, in `out` (created)."""
    arch = ModelArch.from_dir(model_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(arch.num_layers):
        for module in targets:
            d_in, d_out = arch.linear_shape(module)
            part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * std).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * std).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": arch.name or model_dir.name}
    (out / CONFIG_NAME).write_text(json.dumps(config))
    return out


def make_store(model_dir: Path, store: Path, n: int, *, rank: int = 8, distinct: int = 16, seed: int = 0) -> list[str]:
    """`n` adapters named lora-00000... under `store` (shared adapters); returns their names."""
    sources = [write_adapter(model_dir, store / adapter_name(i), rank=rank, seed=seed + i)
               for i in range(min(n, distinct))]
    for i in range(len(sources), n):
        link_adapter(sources[i % len(sources)], store / adapter_name(i))
    return [adapter_name(i) for i in range(n)]


def link_adapter(src: Path, dst: Path) -> None:
    """`dst` as another adapter with `src`'s files, hard-linked (no bytes copied)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        os.link(src / name, dst / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--distinct", type=int, default=16)
    args = p.parse_args(argv)
    make_store(args.model, args.out, args.n, rank=args.rank, distinct=args.distinct)
    print(f"{args.n} adapters in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
