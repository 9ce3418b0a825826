"""Triton in a test process: on a GPU as it is; without one, under the interpreter on CPU.

Import this module before anything imports triton: with no GPU and triton not loaded yet it
switches the interpreter on (TRITON_INTERPRET=1). If another test module loaded triton first,
the interpreter cannot be switched on in this process any more; `rerun_in_child` then runs a
module's interpreter tests in a child process, so the variable never leaks into other tests
(one child for all such modules of a session: tests/child_runs.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch  # does not import triton

from child_runs import rerun_in_child  # noqa: F401 (re-exported; imports no triton)

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
CHILD = os.environ.get("_LORAMUX_CHILD") == "1"  # we are that child
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_module(name: str):
    """kernels.<name>, a Triton kernel module, or None when triton is not installed at all."""
    try:
        return importlib.import_module(f"kernels.{name}")
    except ImportError:  # pragma: no cover - triton missing entirely
        return None
