"""`loramux tenants add-key`: the file edit keeps the operator's file, and refuses what it cannot edit."""

from __future__ import annotations

import stat

import pytest

from server.tenants import TenantFileError, hash_key, load_tenants
from server.tenants.keys import add_key, add_key_text

FILE = """# tenants of the staging cluster
[defaults]
requests_per_minute = 60  # everyone

[tenants.acme]   # the big one
weight = 2
keys = [
  "sha256:{a}", # laptop
  "sha256:{b}"
]
max_concurrent = 4

[tenants."beta"]
weight = 1
""".format(a="a" * 64, b="b" * 64)


def test_add_key_keeps_the_rest_of_the_file(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(FILE)
    path.chmod(0o640)
    for name in ("acme", "beta", "gamma", "acme"):
        key = add_key(path, name)
        assert key.startswith("lmx-") and len(key) >= 40
        table = load_tenants(path)
        assert table.authenticate(key).name == name
    text = path.read_text()
    assert text.startswith("# tenants of the staging cluster\n[defaults]\nrequests_per_minute = 60  # everyone\n")
    assert "[tenants.acme]   # the big one\nweight = 2\nkeys = [\n" in text and "max_concurrent = 4" in text
    acme = load_tenants(path).get("acme")
    assert len(acme.key_hashes) == 4 and "sha256:" + "a" * 64 in acme.key_hashes and acme.limits.max_concurrent == 4
    assert load_tenants(path).get("beta").weight == 1.0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the operator's permissions stay
    assert not [p for p in tmp_path.iterdir() if p.name != "tenants.toml"]  # no temp file left


def test_add_key_creates_a_private_file(tmp_path):
    path = tmp_path / "new.toml"
    key = add_key(path, "solo")
    assert path.read_text() == f'[tenants.solo]\nkeys = ["{hash_key(key)}"]\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_add_key_refuses_what_it_cannot_edit(tmp_path):
    path = tmp_path / "t.toml"
    inline = 'tenants = { acme = { keys = [] } }\n'
    path.write_text(inline)
    with pytest.raises(TenantFileError, match="by hand"):
        add_key(path, "acme")
    assert path.read_text() == inline
    with pytest.raises(TenantFileError, match="must match"):
        add_key(path, "Not Valid")
    # Single-line arrays grow in place.
    one = f'[tenants.x]\nkeys = ["{hash_key("k1")}"]  # first\n'
    assert add_key_text(one, "x", hash_key("k2")) == (f'[tenants.x]\nkeys = [\n  "{hash_key("k1")}",\n'
                                                      f'  "{hash_key("k2")}",\n]  # first\n')
