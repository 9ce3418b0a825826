"""The tenants file (`--tenants FILE`, TOML) and the immutable table built from it.

    [tenants.acme]
    keys = ["sha256:<hex digest of the key>"]   # keys are stored only as hashes
    weight = 1.0                                 # fair share (VTC)
    requests_per_minute = 600
    tokens_per_minute = 200000
    max_concurrent = 64
    max_queued = 256
    max_adapters = 100
    max_adapter_bytes = "2GiB"

An optional `[defaults]` table gives every tenant's limits unless its own table overrides
them. A limit left out is unlimited. With no file and no `--api-keys` the server is open:
one tenant, `default`, with no key and no limits.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from server.config import parse_bytes

OPEN_TENANT = "default"
TENANT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")


class TenantFileError(ValueError):
    """The tenants file is unreadable or invalid; the message names the key at fault."""


def hash_key(key: str) -> str:
    """The stored form of an API key: `sha256:<64 hex digits>`."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant bounds; None = unlimited."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None  # prompt + max_tokens, reserved at admission
    max_concurrent: int | None = None  # requests running or queued in the engine
    max_queued: int | None = None  # requests waiting for admission
    max_adapters: int | None = None  # adapters the tenant owns
    max_adapter_bytes: int | None = None  # their total size on disk


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0
    key_hashes: frozenset[str] = frozenset()
    limits: TenantLimits = TenantLimits()


class TenantTable:
    """Tenants by name and by key hash. Immutable: a reload builds a new table."""

    def __init__(self, tenants: list[Tenant], *, open_access: bool = False):
        self.open_access = open_access
        self._by_name = {t.name: t for t in tenants}
        self._by_hash = {h: t for t in tenants for h in t.key_hashes}

    @classmethod
    def open(cls) -> TenantTable:
        return cls([Tenant(OPEN_TENANT)], open_access=True)

    @classmethod
    def from_api_keys(cls, api_keys: dict[str, str]) -> TenantTable:
        """`--api-keys KEY=TENANT ...`: tenants with weight 1 and no limits."""
        hashes: dict[str, set[str]] = {}
        for key, name in api_keys.items():
            _check_name(name, "--api-keys")
            hashes.setdefault(name, set()).add(hash_key(key))
        return cls([Tenant(name, key_hashes=frozenset(h)) for name, h in hashes.items()])

    def authenticate(self, token: str | None) -> Tenant | None:
        """The tenant a bearer token belongs to; the open tenant when access is open; else None."""
        if self.open_access:
            return self._by_name[OPEN_TENANT]
        if not token:
            return None
        return self._by_hash.get(hash_key(token))  # a dict lookup on a hash leaks nothing of the key

    def get(self, name: str) -> Tenant | None:
        return self._by_name.get(name)

    def __iter__(self):
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


def _check_name(name: str, where: str) -> None:
    if not TENANT_NAME_RE.fullmatch(name):
        raise TenantFileError(f"{where}: tenant name {name!r} must match {TENANT_NAME_RE.pattern}")


_LIMIT_TYPES = {f.name: f for f in fields(TenantLimits)}


def _limits(table: dict[str, Any], base: TenantLimits, where: str) -> TenantLimits:
    values = {}
    for key, raw in table.items():
        if key not in _LIMIT_TYPES:
            continue
        values[key] = _limit(key, raw, f"{where}.{key}")
    return replace(base, **values)


def _limit(key: str, raw: Any, where: str) -> int | float:
    """One limit's value: a finite number >= 0 (an integer for `max_*`); only `max_adapter_bytes`
    may be a size string ("2GiB"). TOML's inf and nan are mistakes, not "unlimited"."""
    value = raw
    if key == "max_adapter_bytes" and isinstance(raw, str):
        try:
            value = parse_bytes(raw)
        except (ValueError, OverflowError):
            raise TenantFileError(f"{where}: not a size: {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TenantFileError(f"{where}: must be a finite number >= 0, got {raw!r}")
    if key.startswith("max_"):
        if value != int(value):
            raise TenantFileError(f"{where}: must be an integer, got {raw!r}")
        return int(value)
    return float(value)


def parse_tenants(data: dict[str, Any]) -> TenantTable:
    """A parsed tenants document -> table; TenantFileError names the first bad key."""
    unknown = set(data) - {"tenants", "defaults"}
    if unknown:
        raise TenantFileError(f"unknown top-level key(s): {', '.join(sorted(unknown))} (expected tenants, defaults)")
    defaults_table = data.get("defaults", {})
    if not isinstance(defaults_table, dict):
        raise TenantFileError("defaults: must be a table")
    bad = set(defaults_table) - set(_LIMIT_TYPES)
    if bad:
        raise TenantFileError(f"defaults: unknown key(s) {', '.join(sorted(bad))}")
    defaults = _limits(defaults_table, TenantLimits(), "defaults")
    tenants_table = data.get("tenants", {})
    if not isinstance(tenants_table, dict):
        raise TenantFileError("tenants: must be a table of tables ([tenants.NAME])")
    tenants, seen_hashes = [], set()
    for name, table in tenants_table.items():
        where = f"tenants.{name}"
        _check_name(name, where)
        if not isinstance(table, dict):
            raise TenantFileError(f"{where}: must be a table")
        bad = set(table) - set(_LIMIT_TYPES) - {"keys", "weight"}
        if bad:
            raise TenantFileError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
        keys = table.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) and _HASH_RE.fullmatch(k) for k in keys):
            raise TenantFileError(f"{where}.keys: must be a list of \"sha256:<64 lowercase hex digits>\" "
                                  "(use `loramux tenants add-key`)")
        for k in keys:
            if k in seen_hashes:
                raise TenantFileError(f"{where}.keys: a key hash is listed for two tenants")
            seen_hashes.add(k)
        weight = table.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise TenantFileError(f"{where}.weight: must be a number > 0, got {weight!r}")
        tenants.append(Tenant(name, float(weight), frozenset(keys), _limits(table, defaults, where)))
    if not tenants:
        raise TenantFileError("no tenants declared ([tenants.NAME] tables)")
    return TenantTable(tenants)


def load_tenants(path: str | Path) -> TenantTable:
    """Read and validate a tenants file; TenantFileError on any problem (the old table stays in force)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise TenantFileError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise TenantFileError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TenantFileError(f"{path}: invalid TOML: {exc}") from None
    try:
        return parse_tenants(data)
    except TenantFileError as exc:
        raise TenantFileError(f"{path}: {exc}") from None
