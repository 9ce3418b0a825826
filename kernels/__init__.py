"""Segmented LoRA ops over a preallocated slot pool: tensors in, tensors out (no server imports)."""

from .lora import BACKENDS, add_lora, lora_expand, lora_shrink
from .mixture import (DoraTokens, LoraRows, RouteTable, RowPlan, add_lora_rows, arrow_weights, dora_rescale,
                      row_weights)
from .segments import LoraSegments

__all__ = ["BACKENDS", "DoraTokens", "LoraRows", "LoraSegments", "RouteTable", "RowPlan", "add_lora",
           "add_lora_rows", "arrow_weights", "dora_rescale", "lora_expand", "lora_shrink", "row_weights"]
