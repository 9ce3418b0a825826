"""`loramux tenants add-key NAME --file FILE`: a new random API key for a tenant.

The key is printed once and only its hash is written, into `keys` of `[tenants.NAME]`. The
file is edited as text so the operator's comments and layout survive (tomllib only reads
TOML): the hash goes into the existing `keys = [...]` array, or a `keys` line goes under the
table's header, or a new table is appended (the file is created if absent). The result is
re-parsed and checked before it atomically replaces the file; anything unexpected (say, the
tenant written as an inline table) is refused with a message instead of a guess.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import tomllib
from pathlib import Path

from server.tenants.table import TENANT_NAME_RE, TenantFileError, hash_key, load_tenants, parse_tenants

KEY_PREFIX = "lmx-"
KEY_BYTES = 32  # 256 random bits


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def _header_re(name: str) -> re.Pattern:
    """`[tenants.NAME]` (NAME bare or quoted), alone on its line apart from a comment."""
    quoted = f"(?:{re.escape(name)}|\"{re.escape(name)}\"|'{re.escape(name)}')"
    return re.compile(rf"^[ \t]*\[[ \t]*tenants[ \t]*\.[ \t]*{quoted}[ \t]*\][ \t]*(?:#.*)?$", re.M)


_NEXT_HEADER = re.compile(r"^[ \t]*\[", re.M)
_KEYS_LINE = re.compile(r"^[ \t]*keys[ \t]*=[ \t]*\[", re.M)


def _array_end(text: str, start: int) -> int:
    """Index of the `]` closing the array whose `[` is at `start - 1` (strings and comments skipped)."""
    i, depth = start, 1
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = text.index(c, i + 1)  # the hashes hold no escapes; a bad file fails the re-parse
        elif c == "#":
            i = text.find("\n", i)
            if i < 0:
                break
        elif c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise TenantFileError("unterminated keys array")


def _array(hashes: list[str]) -> str:
    if len(hashes) == 1:
        return f'["{hashes[0]}"]'
    return "[\n" + "".join(f'  "{h}",\n' for h in hashes) + "]"


def add_key_text(text: str, name: str, key_hash: str) -> str:
    """`text` (a valid tenants file) with `key_hash` added to tenant `name`'s keys. An existing
    keys array is rewritten whole (comments inside it are not kept); all else is untouched."""
    header = _header_re(name).search(text)
    if header is None:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{sep}[tenants.{name}]\nkeys = {_array([key_hash])}\n"
    body_start = header.end()
    nxt = _NEXT_HEADER.search(text, body_start + 1)
    body_end = nxt.start() if nxt else len(text)
    keys = _KEYS_LINE.search(text, body_start, body_end)
    if keys is None:
        return f"{text[:body_start]}\nkeys = {_array([key_hash])}{text[body_start:]}"
    close = _array_end(text, keys.end())
    old = tomllib.loads("keys = " + text[keys.end() - 1:close + 1])["keys"]
    return text[:keys.end() - 1] + _array([*old, key_hash]) + text[close + 1:]


def add_key(path: str | Path, name: str) -> str:
    """Add a new key to tenant `name` in the file at `path` (created if absent); returns the key."""
    if not TENANT_NAME_RE.fullmatch(name):
        raise TenantFileError(f"tenant name {name!r} must match {TENANT_NAME_RE.pattern}")
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if text.strip():
        load_tenants(path)  # a broken file is the operator's to fix first: never edit one
    key = new_key()
    key_hash = hash_key(key)
    updated = add_key_text(text, name, key_hash)
    try:
        table = parse_tenants(tomllib.loads(updated))
    except (tomllib.TOMLDecodeError, TenantFileError) as exc:
        raise TenantFileError(f"{path}: cannot add the key automatically ({exc}); add "
                              f'"{key_hash}" to [tenants.{name}] keys by hand') from None
    tenant = table.get(name)
    if tenant is None or key_hash not in tenant.key_hashes:
        raise TenantFileError(f"{path}: cannot add the key automatically; add \"{key_hash}\" to "
                              f"[tenants.{name}] keys by hand")
    _write_atomically(path, updated)
    return key


def _write_atomically(path: Path, text: str) -> None:
    """Write beside the file and rename over it: a crash leaves the old file or the new one."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600  # key hashes: not world-readable by default
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
