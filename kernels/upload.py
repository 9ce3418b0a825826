"""Host data to the device in one copy, never a host wait on a GPU.

A copy from pageable memory makes the host wait for everything queued on the stream (the step's
forward, still running): a synchronisation per step. From pinned memory the copy is queued
instead; the pinned block goes back to torch's caching host allocator, which reuses it only
after the copy has run."""

from __future__ import annotations

from array import array

import torch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` (a CPU tensor) as a new tensor on `device`: to a GPU through pinned memory, without
    waiting; elsewhere a copy (never an alias of `host`)."""
    if torch.device(device).type == "cuda":
        return (host if host.is_pinned() else host.pin_memory()).to(device, non_blocking=True)
    return host.to(device, copy=True)


def upload(buf: array, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host array (typecode matching dtype, non-empty) as a new tensor on `device`, in one copy."""
    return to_device(torch.frombuffer(buf, dtype=dtype), device)
