"""Segmented LoRA ops over a preallocated slot pool: tensors in, tensors out (no server imports)."""

from .lora import BACKENDS, add_lora, lora_expand, lora_shrink
from .segments import LoraSegments

__all__ = ["BACKENDS", "LoraSegments", "add_lora", "lora_expand", "lora_shrink"]
