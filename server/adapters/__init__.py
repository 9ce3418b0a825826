"""Adapters: PEFT LoRA parsing and validation, the store, the registry, the host cache and the device
slots, used through one entry point (manager.AdapterManager)."""

from .errors import AdapterError
from .lora_weights import LoraAdapter, LoraModuleWeights
from .peft_format import (
    DEFAULT_MAX_BYTES,
    AdapterSummary,
    inspect_peft_adapter,
    load_peft_adapter,
    parse_peft_adapter,
    read_adapter_config,
    scan_adapter_store,
    validate_adapter_name,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "AdapterError",
    "AdapterSummary",
    "LoraAdapter",
    "LoraModuleWeights",
    "inspect_peft_adapter",
    "load_peft_adapter",
    "parse_peft_adapter",
    "read_adapter_config",
    "scan_adapter_store",
    "validate_adapter_name",
]
