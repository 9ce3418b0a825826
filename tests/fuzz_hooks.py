"""schemathesis hooks of tests/test_api_fuzz.py (loaded by name from its config): send a
served model and bound the work of every generated request."""

from __future__ import annotations

import os
from typing import Any

import schemathesis

MODEL = os.environ.get("LORAMUX_FUZZ_MODEL", "tiny")
MAX_TOKENS = 4  # keeps every generation a few engine steps long
MAX_N = 2


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@schemathesis.hook
def map_body(_ctx, body: Any) -> Any:
    """Fields the generator made invalid stay invalid: only well-typed values are replaced."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    if body.get("max_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # unset means "up to the context": too slow here
    for field in ("max_tokens", "max_completion_tokens"):
        if _is_int(body.get(field)):
            body[field] = min(body[field], MAX_TOKENS)
    if _is_int(body.get("n")):
        body["n"] = min(body["n"], MAX_N)
    return body
