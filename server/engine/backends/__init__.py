"""The engine's attention and LoRA backends, chosen once at start for the device.

`select_attention` / `select_lora` turn `--attention-backend` / `--lora-backend` (auto or a
name) into a backend object; `auto` takes the first backend of the device's list that can run
and logs the choice (and why earlier ones could not); an explicit choice that cannot run is a
BackendError at start.
"""

from __future__ import annotations

import logging

import torch

from server.model.arch import ModelArch

from .attention import ATTENTION_BACKENDS, AUTO_ATTENTION, AttentionBackend, StepBatch
from .lora import AUTO_LORA, LORA_BACKENDS, LoraBackend, LoraStep

__all__ = ["ATTENTION_BACKENDS", "LORA_BACKENDS", "AttentionBackend", "BackendError", "LoraBackend",
           "LoraStep", "StepBatch", "select_attention", "select_lora"]

log = logging.getLogger(__name__)


class BackendError(ValueError):
    """An explicitly chosen backend cannot run here (or no backend can)."""


def _pick(kind: str, choice: str, names: dict, auto: dict, device: torch.device, why) -> str:
    if choice != "auto":
        if choice not in names:
            raise BackendError(f"--{kind}-backend: expected auto or one of {', '.join(names)}, got {choice!r}")
        reason = why(names[choice])
        if reason:
            raise BackendError(f"--{kind}-backend {choice} cannot run here: {reason}")
        log.info("%s backend: %s (chosen)", kind, choice)
        return choice
    skipped = []
    for name in auto.get(device.type, ()):
        reason = why(names[name])
        if reason is None:
            log.info("%s backend: %s (auto for %s%s)", kind, name, device.type,
                     "".join(f"; not {n}: {r}" for n, r in skipped))
            return name
        skipped.append((name, reason))
    raise BackendError(f"no {kind} backend for {device.type}: "
                       + ("; ".join(f"{n}: {r}" for n, r in skipped) or "none is known"))


def select_attention(choice: str, arch: ModelArch, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    name = _pick("attention", choice, ATTENTION_BACKENDS, AUTO_ATTENTION, device,
                 lambda cls: cls.unavailable(arch, device, dtype))
    return ATTENTION_BACKENDS[name](arch, device, dtype)


def select_lora(choice: str, device: torch.device) -> LoraBackend:
    name = _pick("lora", choice, LORA_BACKENDS, AUTO_LORA, device, lambda cls: cls.unavailable(device))
    return LORA_BACKENDS[name](device)
