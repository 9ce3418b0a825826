"""Triton in a test process: on a GPU as it is; without one, under the interpreter on CPU.

Import this module before anything imports triton: with no GPU and triton not loaded yet it
switches the interpreter on (TRITON_INTERPRET=1). If another test module loaded triton first,
the interpreter cannot be switched on in this process any more; `rerun_in_child` then runs a
module's interpreter tests in a child process, so the variable never leaks into other tests.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import torch  # does not import triton

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
CHILD = os.environ.get("_LORAMUX_CHILD") == "1"  # we are that child
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rerun_in_child(test_file: str, keyword: str = "triton_interp", interpret: bool = True) -> None:
    """Run the tests of `test_file` matching `keyword` in a child, under the interpreter (or, with
    interpret=False, with kernels compiled for a GPU target: tests/sm90_aot.py); assert they pass."""
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0", _LORAMUX_CHILD="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file,
                        "-k", keyword], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def kernel_module(name: str):
    """kernels.<name>, a Triton kernel module, or None when triton is not installed at all."""
    try:
        return importlib.import_module(f"kernels.{name}")
    except ImportError:  # pragma: no cover - triton missing entirely
        return None
