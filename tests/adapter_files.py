"""Tiny random base models and PEFT-made adapters on them, for the adapter-format tests
(tests/test_adapter_format.py: parity with PEFT; tests/test_adapter_refusals.py: what is refused).

Adapters are made by PEFT (`get_peft_model` + `save_pretrained`) with random B (PEFT initialises
it to zero), so every adapted module carries a real delta.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from server.adapters import AdapterError, load_peft_adapter
from server.model.arch import ModelArch

TINY = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Base:
    """A tiny random base model family member and its ModelArch."""

    config: transformers.PretrainedConfig

    @property
    def arch(self) -> ModelArch:
        return ModelArch.from_hf_config(self.config.to_dict())

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(self.config).eval()


LLAMA = Base(transformers.LlamaConfig(**TINY))
QWEN2 = Base(transformers.Qwen2Config(**TINY))  # q/k/v carry biases
MISTRAL = Base(transformers.MistralConfig(**TINY, head_dim=32))  # q_size 128 != hidden 64


def make_adapter(base: Base, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A PEFT-made adapter with random A and (unlike PEFT's zero init) random B, saved to `out`."""
    peft_model = get_peft_model(base.model(), LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(str(out))
    return out


def peft_lora_layers(base: Base, adapter_dir: Path) -> dict[tuple[int, str], LoraLayer]:
    """(layer, projection) -> PEFT's LoRA layer, as PEFT itself loads `adapter_dir`."""
    return lora_layers(PeftModel.from_pretrained(base.model(), str(adapter_dir)).eval())


def lora_layers(peft_model: torch.nn.Module) -> dict[tuple[int, str], LoraLayer]:
    """(layer, projection) -> each LoRA layer of a loaded PEFT model (its "default" adapter)."""
    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            parts = name.split(".")
            layers[(int(parts[parts.index("layers") + 1]), parts[-1])] = module
    return layers


def load(path: Path, base: Base = LLAMA, **kwargs):
    kwargs.setdefault("max_rank", 64)
    return load_peft_adapter(path, base.arch, name="t", **kwargs)


def refused(path: Path, code: str, *needles: str, base: Base = LLAMA, **kwargs) -> AdapterError:
    with pytest.raises(AdapterError) as info:
        load(path, base, **kwargs)
    err = info.value
    print(f"[{err.code}] {err}")  # shown by pytest on failure, and with -s for reviewing messages
    assert err.code == code, str(err)
    for needle in needles:
        assert needle in str(err), f"{needle!r} not in {err}"
    return err


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / CONFIG).read_text())
    cfg.update(changes)
    (path / CONFIG).write_text(json.dumps(cfg))


def edit_weights(path: Path, fn) -> None:
    tensors = load_file(str(path / WEIGHTS))
    save_file(fn(dict(tensors)), str(path / WEIGHTS), metadata={"format": "pt"})
