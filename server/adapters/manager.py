"""The adapter tiers wired together for the engine: registry (disk) -> host cache -> device slots."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from server.config import LoraConfig
from server.metrics import Metrics
from server.model.arch import ModelArch

from .errors import AdapterError
from .host_cache import HostAdapterCache
from .registry import AdapterRegistry
from .slots import LoraSlots

log = logging.getLogger(__name__)


class AdapterManager:
    def __init__(self, cfg: LoraConfig, arch: ModelArch, dtype: torch.dtype, device: torch.device,
                 metrics: Metrics, on_loaded: Callable[[], None] | None = None, *,
                 reserved_names: Iterable[str] = ()):
        """`reserved_names`: ids no adapter may take (the base model's served name)."""
        roots = [Path(cfg.adapters_dir)] if cfg.adapters_dir else []
        roots += [Path(p) for p in cfg.allowed_adapter_roots]
        self.registry = AdapterRegistry(arch, cfg.max_lora_rank, roots, reserved_names=reserved_names)
        if cfg.adapters_dir:
            self.registry.scan_store(Path(cfg.adapters_dir))
        for name, path in cfg.lora_modules.items():  # named explicitly: a bad one is a startup error
            try:
                self.registry.add(name, path, "cli", replace=True)
            except AdapterError as exc:
                log.error("--lora-modules %s: %s", name, exc.detail)
                raise
        self._metrics = metrics
        self.cache = HostAdapterCache(self.registry, cfg.max_cpu_loras, cfg.cpu_lora_cache_memory, metrics, on_loaded)
        lora_dtype = dtype if cfg.lora_dtype == "auto" else getattr(torch, cfg.lora_dtype)
        self.slots = LoraSlots(arch, cfg.max_loras, cfg.max_lora_rank, lora_dtype, device, metrics)
        log.info("adapters: %d registered (%s); %d device slots x rank %d, %.0f MiB; host cache %d adapters",
                 len(self.registry.entries()), ", ".join(e.name for e in self.registry.entries()[:8]),
                 cfg.max_loras, cfg.max_lora_rank, self.slots.nbytes / 2**20, cfg.max_cpu_loras)

    def forget(self, name: str) -> None:
        """Drop every resident copy of `name` (engine thread; after an unregister or a replace)."""
        self.cache.drop(name)
        self.slots.evict(name)
        self._metrics.forget_adapter(name)
