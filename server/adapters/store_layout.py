"""The on-disk adapter store: one subdirectory per adapter, its name the adapter id.

```
adapters_store/
  sql-expert/            shared adapter "sql-expert"
    adapter_config.json
    adapter_model.safetensors
  _tenants/
    acme/
      support-bot/       adapter "support-bot" owned by tenant "acme"
  .tmp-upload-*/         uploads being written (removed at start: a crash leaves no half adapter)
  .trash/                deleted adapters still draining (removed at start)
```

`_tenants` cannot be an adapter id (ids start with a letter or digit), so tenant
subdirectories never collide with shared adapters; tenant names are [a-z0-9_-].

Adapter ids travel in URLs, JSON and file paths, so they are restricted to a
conservative alphabet that cannot express path traversal ("..", "/", "\\",
absolute paths, NUL) or hidden files.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import INVALID, AdapterError

log = logging.getLogger(__name__)

ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TENANTS_DIR = "_tenants"
TMP_PREFIX = ".tmp-upload-"
TRASH_DIR = ".trash"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def validate_adapter_name(name: str) -> str:
    """`name` if it is a valid adapter id (1-64 of [A-Za-z0-9._-], alphanumeric first); else AdapterError."""
    # fullmatch, not match + "$": "$" also matches before a trailing newline.
    if not isinstance(name, str) or ADAPTER_NAME_RE.fullmatch(name) is None:
        shown = repr(name)[:80]
        raise AdapterError(
            INVALID,
            f"invalid adapter id {shown}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit",
        )
    return name


def scan_adapter_store(root: Path) -> dict[str, Path]:
    """Adapter id -> directory for every adapter directory directly under `root`, sorted by id.

    An adapter directory holds an `adapter_config.json`. Entries with invalid ids,
    plain files, directories without a config, directory symlinks that resolve outside
    `root`, and directories whose adapter files are symlinks (adapter files must be
    regular files: see safe_files.py) are skipped with a log line; nothing is parsed
    beyond that (use `read_adapter_config` / `load_peft_adapter`). The returned paths
    are resolved; loads re-check everything as they open the files, so a symlink
    swapped in later cannot redirect a read. A missing `root` yields an empty store.
    """
    root = Path(root)
    if not root.is_dir():
        log.warning("adapter store %s does not exist or is not a directory; no adapters", root)
        return {}
    real_root = root.resolve()
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name == TENANTS_DIR:  # tenants' adapters: see scan_tenant_stores
            continue
        try:
            validate_adapter_name(entry.name)
        except AdapterError:
            # Hidden entries (.git, .DS_Store, .tmp-upload-*) are expected; anything else is worth a look.
            log.log(logging.DEBUG if entry.name.startswith(".") else logging.WARNING,
                    "adapter store: skipping %s: not a valid adapter id", entry)
            continue
        try:
            real = entry.resolve()
        except (OSError, RuntimeError) as exc:  # symlink loops: RuntimeError before 3.13, OSError after
            log.warning("adapter store: skipping %s: %s", entry, exc)
            continue
        if not _inside(real, real_root):
            log.warning("adapter store: skipping %s: symlink to %s escapes the store", entry, real)
            continue
        if not real.is_dir():
            log.info("adapter store: skipping %s: not a directory", entry)
            continue
        linked = [f.name for f in (real / CONFIG_NAME, real / WEIGHTS_NAME) if f.is_symlink()]
        if linked:
            log.warning("adapter store: skipping %s: symlinked %s; adapter files must be regular files", entry,
                        " and ".join(linked))
            continue
        if not (real / CONFIG_NAME).is_file():
            log.info("adapter store: skipping %s: no %s", entry, CONFIG_NAME)
            continue
        found[entry.name] = real
    return found


def _inside(path: Path, root: Path) -> bool:
    # Strictly below: a link to the store root itself is not an adapter either.
    return root in path.parents


def scan_tenant_stores(root: Path) -> dict[str, dict[str, Path]]:
    """Tenant -> (adapter id -> directory) for every tenant subdirectory of `root`/_tenants,
    with `scan_adapter_store`'s rules; a tenant directory that is a symlink or has an invalid
    name is skipped with a log line."""
    from server.tenants.table import TENANT_NAME_RE

    tenants_root = Path(root) / TENANTS_DIR
    if not tenants_root.is_dir() or tenants_root.is_symlink():
        return {}
    found = {}
    for entry in sorted(tenants_root.iterdir(), key=lambda p: p.name):
        if entry.is_symlink() or not entry.is_dir() or not TENANT_NAME_RE.fullmatch(entry.name):
            log.warning("adapter store: skipping %s: not a tenant directory", entry)
            continue
        found[entry.name] = scan_adapter_store(entry)
    return found
