"""The tenants file: parsing, validation messages, key lookup."""

from __future__ import annotations

import pytest

from server.tenants import OPEN_TENANT, TenantFileError, TenantTable, hash_key, load_tenants
from server.tenants.table import parse_tenants

KEY_A, KEY_B = "sk-acme-1", "sk-beta-1"


def write(tmp_path, text: str):
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return path


def test_a_full_file_parses_with_defaults_and_overrides(tmp_path):
    path = write(tmp_path, f"""
[defaults]
requests_per_minute = 60
max_adapter_bytes = "1MiB"

[tenants.acme]
keys = ["{hash_key(KEY_A)}"]
weight = 2.5
tokens_per_minute = 200000
max_concurrent = 64

[tenants.beta]
keys = ["{hash_key(KEY_B)}"]
requests_per_minute = 5
""")
    table = load_tenants(path)
    acme, beta = table.get("acme"), table.get("beta")
    assert acme.weight == 2.5 and beta.weight == 1.0
    assert acme.limits.requests_per_minute == 60 and beta.limits.requests_per_minute == 5
    assert acme.limits.tokens_per_minute == 200000 and beta.limits.tokens_per_minute is None
    assert acme.limits.max_concurrent == 64 and acme.limits.max_adapter_bytes == 1 << 20
    assert table.authenticate(KEY_A) is acme and table.authenticate(KEY_B) is beta
    assert table.authenticate("sk-other") is None and table.authenticate("") is None
    assert not table.open_access and OPEN_TENANT not in table


def test_the_stored_form_is_a_sha256_hex_digest():
    # A digest computed independently of our helper: sha256("abc").
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("text, names", [
    ('[tenants.acme]\nkeys = ["sk-plain-key"]', "tenants.acme.keys"),
    ('[tenants.acme]\nweight = 0', "tenants.acme.weight"),
    ('[tenants.acme]\nweight = "heavy"', "tenants.acme.weight"),
    ('[tenants.acme]\nmax_concurrent = -1', "tenants.acme.max_concurrent"),
    ('[tenants.acme]\nmax_concurrent = 1.5', "tenants.acme.max_concurrent"),
    ('[tenants.acme]\nrequests_per_mintue = 5', "requests_per_mintue"),
    ('[tenants."../etc"]\nweight = 1', "../etc"),
    ('[tenant.acme]\nweight = 1', "tenant"),
    ('[defaults]\nweight = 2', "defaults"),
    ('', "no tenants"),
    ('[tenants.acme\n', "invalid TOML"),
    # Non-finite or mistyped limits are mistakes too, named like the others (before: inf or nan
    # in an integer limit raised OverflowError / ValueError out of the parser, and a nan or a
    # string rate was taken as is).
    ('[tenants.acme]\nmax_concurrent = inf', "tenants.acme.max_concurrent"),
    ('[tenants.acme]\nmax_queued = nan', "tenants.acme.max_queued"),
    ('[tenants.acme]\nmax_adapter_bytes = inf', "tenants.acme.max_adapter_bytes"),
    ('[tenants.acme]\nmax_adapter_bytes = "infGiB"', "tenants.acme.max_adapter_bytes"),
    ('[tenants.acme]\nrequests_per_minute = nan', "tenants.acme.requests_per_minute"),
    ('[tenants.acme]\ntokens_per_minute = inf', "tenants.acme.tokens_per_minute"),
    ('[tenants.acme]\nrequests_per_minute = "600"', "tenants.acme.requests_per_minute"),
    ('[tenants.acme]\nmax_adapters = true', "tenants.acme.max_adapters"),
    ('[defaults]\ntokens_per_minute = -inf', "defaults.tokens_per_minute"),
])
def test_a_bad_file_is_refused_naming_what_is_wrong(tmp_path, text, names):
    with pytest.raises(TenantFileError, match=names.replace(".", r"\.")):
        load_tenants(write(tmp_path, text))


def test_a_file_that_is_not_utf8_is_refused_not_raised(tmp_path):
    """(Before: UnicodeDecodeError out of load_tenants, so a reload answered 500.)"""
    path = tmp_path / "tenants.toml"
    path.write_bytes(b"[tenants.caf\xe9]\n")
    with pytest.raises(TenantFileError, match="not UTF-8"):
        load_tenants(path)


def test_one_key_cannot_belong_to_two_tenants():
    h = hash_key(KEY_A)
    with pytest.raises(TenantFileError, match="two tenants"):
        parse_tenants({"tenants": {"a": {"keys": [h]}, "b": {"keys": [h]}}})


def test_open_and_api_key_tables():
    assert TenantTable.open().authenticate(None).name == OPEN_TENANT
    table = TenantTable.from_api_keys({KEY_A: "acme", "sk-acme-2": "acme", KEY_B: "beta"})
    assert table.authenticate("sk-acme-2") is table.authenticate(KEY_A) is table.get("acme")
    assert table.get("beta").limits.max_concurrent is None
    with pytest.raises(TenantFileError):
        TenantTable.from_api_keys({KEY_A: "Bad Name"})
