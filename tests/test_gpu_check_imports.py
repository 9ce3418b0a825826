"""The GPU check and the GPU tests it runs import nothing from the HTTP server's stack.

A GPU host's Python is not this project's virtual environment: the one loadtest/gpu_check.py is
prepared for holds torch, Triton, transformers, PEFT, safetensors, tokenizers, prometheus-client,
jinja2 and pytest, but neither FastAPI, pydantic, pyzmq, msgspec, openai nor gguf (they serve
HTTP, the engine-process IPC and the one-time model conversion, none of which the check runs).
An import of one of them on the engine's path would end that one GPU run at its first line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "multipart", "python_multipart",
               "zmq", "msgspec", "openai", "gguf", "schemathesis")
# the check itself, then what the GPU tests import (their own modules need CUDA to do anything)
MODULES = ("loadtest.gpu_check", "loadtest.bench_attention", "loadtest.bench_pages", "loadtest.bench_kernels",
           "server.engine.engine", "conftest", "peft_adapters", "engine_runs", "paged_pools")

BLOCKER = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ModuleNotFoundError(f"{{name}} is not there", name=name)
sys.meta_path.insert(0, Block())
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
for m in {MODULES!r}:
    importlib.import_module(m)
"""


def test_the_gpu_check_needs_none_of_the_server_stack():
    r = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
