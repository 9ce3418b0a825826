"""Adapters: PEFT LoRA parsing and validation (registry, host cache and device slots to come)."""

from .errors import AdapterError
from .peft_format import (
    DEFAULT_MAX_BYTES,
    LoraAdapter,
    LoraModuleWeights,
    load_peft_adapter,
    read_adapter_config,
    scan_adapter_store,
    validate_adapter_name,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "AdapterError",
    "LoraAdapter",
    "LoraModuleWeights",
    "load_peft_adapter",
    "read_adapter_config",
    "scan_adapter_store",
    "validate_adapter_name",
]
