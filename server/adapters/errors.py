"""The one exception every adapter refusal raises, with a machine-readable code.

The API layer maps `code` to an HTTP status / OpenAI error type. `str(err)` is the
public message: the reason, prefixed with the file's name only (never a directory,
a configured root or any byte of the file), so it is safe to send to a client.
`err.detail` adds the full path, for the server log.
"""

from __future__ import annotations

from pathlib import Path

# The adapter id / directory does not exist.
NOT_FOUND = "adapter_not_found"
# The files are broken or self-inconsistent (bad JSON, corrupt safetensors, NaNs,
# tensors that disagree with adapter_config.json, a bad adapter id, ...).
INVALID = "adapter_invalid"
# Well-formed, but uses something this server does not serve (LoRA bias, pickle
# weights, embedding/lm_head targets, rank above the server's max_rank, ...).
UNSUPPORTED = "adapter_unsupported"
# Well-formed LoRA, but made for a different base model (shapes, layer count).
INCOMPATIBLE = "adapter_incompatible"

# An admin asked to register a path outside the allowed adapter roots.
FORBIDDEN = "adapter_forbidden"
# A name that is taken (or the base model's).
EXISTS = "adapter_exists"

# A tenant's upload would pass its max_adapters / max_adapter_bytes.
QUOTA = "quota_exceeded"
# Uploads need an adapter store (--adapters-dir) and there is none.
NO_STORE = "adapter_store_disabled"

CODES = (NOT_FOUND, INVALID, UNSUPPORTED, INCOMPATIBLE, FORBIDDEN, EXISTS, QUOTA, NO_STORE)


class AdapterError(ValueError):
    """A refused adapter.

    `code`: one of CODES; `reason`: what is wrong, in words; `path`: the file or
    directory concerned (server-side only); `shown`: the name the public message
    starts with (default: the last component of `path`; "" for none).
    """

    code: str

    def __init__(self, code: str, reason: str, *, path: Path | str | None = None, shown: str | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown AdapterError code {code!r}")
        self.code = code
        self.reason = reason
        self.path = Path(path) if path is not None else None
        if shown is None:
            shown = self.path.name if self.path is not None else ""
        super().__init__(f"{shown}: {reason}" if shown else reason)

    @property
    def detail(self) -> str:
        """The message with the full path: for the server log, never for a client."""
        return f"{self.path}: {self.reason}" if self.path is not None else self.reason
