"""The one exception every adapter refusal raises, with a machine-readable code.

The API layer maps `code` to an HTTP status / OpenAI error type; the message is
for humans and always names the file (or adapter id) and the reason.
"""

from __future__ import annotations

from pathlib import Path

# The adapter id / directory does not exist.
NOT_FOUND = "adapter_not_found"
# The files are broken or self-inconsistent (bad JSON, corrupt safetensors, NaNs,
# tensors that disagree with adapter_config.json, a bad adapter id, ...).
INVALID = "adapter_invalid"
# Well-formed, but uses something this server does not serve (DoRA, pickle
# weights, embedding/lm_head targets, rank above the server's max_rank, ...).
UNSUPPORTED = "adapter_unsupported"
# Well-formed LoRA, but made for a different base model (shapes, layer count).
INCOMPATIBLE = "adapter_incompatible"

# An admin asked to register a path outside the allowed adapter roots.
FORBIDDEN = "adapter_forbidden"
# An admin asked to register a name that is taken.
EXISTS = "adapter_exists"

# An admin asked to unload an adapter that queued or running requests still use.
IN_USE = "adapter_in_use"

CODES = (NOT_FOUND, INVALID, UNSUPPORTED, INCOMPATIBLE, FORBIDDEN, EXISTS, IN_USE)


class AdapterError(ValueError):
    """A refused adapter.

    `code` is machine-readable ("adapter_not_found" | "adapter_invalid" |
    "adapter_unsupported" | "adapter_incompatible"); the message names the file
    and the reason.
    """

    code: str

    def __init__(self, code: str, message: str, *, path: Path | str | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown AdapterError code {code!r}")
        self.code = code
        self.path = Path(path) if path is not None else None
        # Prefix the file so every message says where the problem is, even when
        # the caller only logs str(err).
        super().__init__(f"{path}: {message}" if path is not None else message)
