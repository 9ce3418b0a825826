"""Segmented LoRA ops over a preallocated slot pool: tensors in, tensors out (no server imports)."""

from .lora import BACKENDS, add_lora, lora_expand, lora_shrink
from .mixture import (LoraRows, MixTable, RouteTable, add_lora_dense, add_lora_mixed, add_lora_routed, add_lora_rows,
                      arrow_weights, dora_rescale, row_weights)
from .pages import slot_a, slot_b
from .row_plan import DoraTokens, RowPlan, StepRows
from .segments import LoraSegments

__all__ = ["BACKENDS", "DoraTokens", "LoraRows", "LoraSegments", "MixTable", "RouteTable", "RowPlan", "StepRows",
           "add_lora", "add_lora_dense", "add_lora_mixed", "add_lora_routed", "add_lora_rows", "arrow_weights", "dora_rescale", "lora_expand", "lora_shrink",
           "row_weights", "slot_a", "slot_b"]
