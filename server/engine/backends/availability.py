"""Whether the Triton kernels can run on a device: asked once, at engine start."""

from __future__ import annotations

import importlib
import os

import torch


def triton_unavailable(device: torch.device, module: str) -> str | None:
    """Why `kernels.<module>` (a Triton kernel module) cannot run on `device`, or None if it can.

    CUDA needs triton installed; CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set
    before triton is first imported: tests only). Checked without importing triton when the
    answer is already no, so a CPU server never loads it.
    """
    if device.type not in ("cuda", "cpu"):
        return f"no Triton kernels for {device.type} devices"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels on CPU need TRITON_INTERPRET=1 (the interpreter: tests at tiny shapes only)"
    try:
        mod = importlib.import_module(f"kernels.{module}")
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if device.type == "cpu" and not mod.INTERPRETED:
        return "triton was imported before TRITON_INTERPRET=1 was set: its kernels cannot run on CPU"
    return None
