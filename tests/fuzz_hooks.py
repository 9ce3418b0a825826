"""schemathesis hooks of tests/test_api_fuzz.py (loaded by name from its config): send a
served model and bound the work of every generated request; aim admin loads at the
fuzz's adapter root."""

from __future__ import annotations

import os
from typing import Any

import schemathesis

MODEL = os.environ.get("LORAMUX_FUZZ_MODEL", "tiny")
# A directory that is itself a valid adapter and the server's only allowed adapter root.
ADAPTER_ROOT = os.environ.get("LORAMUX_FUZZ_ADAPTER_ROOT", "")
GENERATION_PATHS = {"/v1/completions", "/v1/chat/completions"}
LOAD_PATH = "/v1/load_lora_adapter"
MAX_TOKENS = 4  # keeps every generation a few engine steps long
MAX_N = 2


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@schemathesis.hook
def map_body(ctx, body: Any) -> Any:
    """Fields the generator made invalid stay invalid: only well-typed values are replaced."""
    if not isinstance(body, dict):
        return body
    path = ctx.operation.path if ctx.operation is not None else None
    if path == LOAD_PATH:
        return _load_body(body)
    if path not in GENERATION_PATHS:
        return body
    body = dict(body)
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # unset means "up to the context": too slow here
    for field in ("max_tokens", "max_completion_tokens"):
        if _is_int(body.get(field)):
            body[field] = min(body[field], MAX_TOKENS)
    if _is_int(body.get("n")):
        body["n"] = min(body["n"], MAX_N)
    return body


def _load_body(body: dict) -> dict:
    """A generated non-empty `lora_path` string is taken relative to the adapter root
    (os.path.join: an absolute one stays as generated, `..` may still climb out), so some
    loads succeed and the rest probe the root's edges (NUL bytes and odd characters are kept)."""
    path = body.get("lora_path")
    if ADAPTER_ROOT and isinstance(path, str) and path:  # "" must stay refused
        return {**body, "lora_path": os.path.join(ADAPTER_ROOT, path)}
    return body
