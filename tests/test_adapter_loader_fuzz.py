"""Property-based fuzz of the adapter loader: hostile adapter_config.json contents, safetensors
headers and bytes, symlinks and odd paths.

Properties, for every generated case and every entry point (`AdapterRegistry.check_allowed`,
`AdapterRegistry.add`, `inspect_peft_adapter`, `load_peft_adapter`):
- nothing but AdapterError escapes (no crash, no hang: FIFOs are among the cases);
- no file outside the allowed root is opened: an audit hook sees every Python-level open, and
  every `os.open` (the loader's only way in, also for directory descriptors and the
  /proc/self/fd path safetensors reopens) is checked by where the kernel says its descriptor
  points (/proc/self/fd);
- no message carries a secret planted outside the root (nor its first 8 bytes read as a
  header length), an absolute path, or the header length of a file it does not fit.

Budget: a fixed number of examples per test, derandomized (the same cases on every run),
about 5 s per test on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from server.adapters import AdapterError, inspect_peft_adapter, load_peft_adapter
from server.adapters.registry import AdapterRegistry
from server.model.arch import ModelArch

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="checks reads through /proc/self/fd")

ARCH = ModelArch.from_hf_config(transformers.LlamaConfig(
    hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128).to_dict())
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MARKER = b"LORAMUX-OUTSIDE-SECRET-5b1e9"
MARKER_AS_LENGTH = str(struct.unpack("<Q", MARKER[:8])[0])
# No per-example deadline: an example's time is the machine's, not the loader's (a deadline
# only fires after the example returns, so it never caught a hang; pytest's timeout does).
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def valid_tensors(rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(ARCH.num_layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        out[f"{prefix}.lora_A.weight"] = torch.randn(rank, 64, generator=gen)
        out[f"{prefix}.lora_B.weight"] = torch.randn(64, rank, generator=gen)
    return out


VALID_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
VALID_WEIGHTS = save(valid_tensors())
_HEADER_LEN = struct.unpack("<Q", VALID_WEIGHTS[:8])[0]
VALID_HEADER = json.loads(VALID_WEIGHTS[8:8 + _HEADER_LEN])
VALID_DATA = VALID_WEIGHTS[8 + _HEADER_LEN:]

# ------------------------------------------------------------------ strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern",
               "layers_to_transform", "layers_pattern", "exclude_modules", "use_dora", "bias", "modules_to_save",
               "init_lora_weights", "base_model_name_or_path", "fan_in_fan_out", "lora_bias"]


@st.composite
def config_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["edited", "edited", "any-json", "bytes", "duplicate-keys"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "any-json":
        return json.dumps(draw(json_values)).encode()
    cfg = {**VALID_CONFIG, **draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=3))}
    text = json.dumps(cfg)
    if kind == "duplicate-keys":  # json.dumps cannot write them: splice a second "r" in
        text = text[:-1] + f', "r": {json.dumps(draw(json_values))}}}'
    return text.encode()


dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "", "f32", "X" * 40])
ints = st.integers(-5, 2**64) | st.sampled_from([0, 1, 4, 64, 2**31, 2**63 - 1, 2**64 - 1])


@st.composite
def weights_bytes(draw) -> bytes:
    header = json.loads(json.dumps(VALID_HEADER))
    names = sorted(k for k in header if k != "__metadata__")
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        entry = header[name]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "drop"]))
        if field == "dtype":
            entry["dtype"] = draw(dtypes | json_values)
        elif field == "shape":
            entry["shape"] = draw(st.lists(ints, max_size=3) | json_values)
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(ints, min_size=2, max_size=2) | json_values)
        elif field == "entry":
            header[name] = draw(json_values)
        else:
            del header[name]
    for _ in range(draw(st.integers(0, 2))):
        header[draw(st.text(max_size=70))] = draw(json_values)
    raw = json.dumps(header).encode()
    if draw(st.booleans()) and len(header) > 1:  # a duplicate tensor name
        first = next(iter(header))
        raw = raw[:-1] + f", {json.dumps(first)}: {json.dumps(header[first])}}}".encode()
    raw += b" " * (-len(raw) % 8)
    length = draw(st.none() | ints.filter(lambda n: 0 <= n < 2**64))
    data = VALID_DATA if draw(st.booleans()) else draw(st.binary(max_size=64))
    blob = struct.pack("<Q", len(raw) if length is None else length) + raw + data
    cut = draw(st.none() | st.integers(0, len(blob)))
    return blob if cut is None else blob[:cut]


FILE_KINDS = ["regular", "regular", "regular", "missing", "link-outside-file", "link-outside-dir", "link-loop",
              "dangling", "link-inside", "fifo", "directory"]
DIR_KINDS = ["dir", "dir", "dir", "link-inside", "link-outside", "loop"]
PATH_KINDS = ["plain", "plain", "relative", "dotdot-inside", "dotdot-outside", "nul", "long", "unicode", "root",
              "outside-file", "proc-fd", "empty", "slashes"]

# ------------------------------------------------------------------ read auditing

_opened: list[str] | None = None  # real paths opened while recording, else None


def _audit(event: str, args: tuple) -> None:
    # os.open reports mode None: those are checked by descriptor in _recording_open.
    if _opened is not None and event == "open" and args[1] is not None and isinstance(args[0], (str, bytes)):
        try:
            _opened.append(os.path.realpath(os.fsdecode(args[0])))
        except ValueError:  # NUL or unencodable: the open itself fails
            pass


sys.addaudithook(_audit)  # cannot be removed; inert unless recording
_real_os_open = os.open


def _recording_open(path, flags, mode=0o777, *, dir_fd=None):
    fd = _real_os_open(path, flags, mode, dir_fd=dir_fd)
    _opened.append(os.readlink(f"/proc/self/fd/{fd}"))  # where the kernel says it points
    return fd


@contextlib.contextmanager
def recording_reads():
    global _opened
    _opened = []
    os.open = _recording_open
    try:
        yield _opened
    finally:
        os.open = _real_os_open
        _opened = None


# ------------------------------------------------------------------ the world and the checks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def world(workdir: Path):
    """A fresh root (the allowed one) and an `outside` holding secrets: a file and a whole valid adapter."""
    top = Path(tempfile.mkdtemp(dir=workdir)).resolve()
    root, outside = top / "root", top / "outside"
    root.mkdir()
    (outside / "adapter").mkdir(parents=True)
    (outside / "secret").write_bytes(MARKER + b"\0" * 64 + MARKER)
    (outside / "adapter" / CONFIG).write_text(json.dumps({**VALID_CONFIG, "base_model_name_or_path":
                                                          MARKER.decode()}))
    (outside / "adapter" / WEIGHTS).write_bytes(VALID_WEIGHTS)
    try:
        yield top, root, outside
    finally:
        shutil.rmtree(top)


def place(path: Path, kind: str, content: bytes, outside: Path, root: Path, name: str) -> None:
    if kind == "regular":
        path.write_bytes(content)
    elif kind == "link-outside-file":
        path.symlink_to(outside / "secret")
    elif kind == "link-outside-dir":
        path.symlink_to(outside / "adapter" / name)
    elif kind == "link-loop":
        path.symlink_to(path)
    elif kind == "dangling":
        path.symlink_to(root / "nowhere")
    elif kind == "link-inside":
        (root / f"blob-{name}").write_bytes(content)
        path.symlink_to(root / f"blob-{name}")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()


def build_adapter(root: Path, outside: Path, dir_kind: str, config: bytes, weights: bytes,
                  config_kind: str = "regular", weights_kind: str = "regular") -> Path:
    real = root / "real"
    real.mkdir()
    place(real / CONFIG, config_kind, config, outside, root, CONFIG)
    place(real / WEIGHTS, weights_kind, weights, outside, root, WEIGHTS)
    adapter = root / "a"
    if dir_kind == "dir":
        real.rename(adapter)
    elif dir_kind == "link-inside":
        adapter.symlink_to(real, target_is_directory=True)
    elif dir_kind == "link-outside":
        adapter.symlink_to(outside / "adapter", target_is_directory=True)
    else:
        adapter.symlink_to(adapter)
    return adapter


def path_text(kind: str, adapter: Path, root: Path, outside: Path) -> str:
    return {
        "plain": str(adapter),
        "relative": os.path.relpath(adapter),
        "dotdot-inside": f"{root}/x/../{adapter.name}",
        "dotdot-outside": f"{root}/../outside/adapter",
        "nul": f"{adapter}\0/x",
        "long": f"{root}/" + "d/" * 2500,
        "unicode": f"{root}/\u00fcn\u00efc\u00f8de-\ud800-\U0001f600",
        "root": str(root),
        "outside-file": str(outside / "secret"),
        "proc-fd": "/proc/self/fd/0",
        "empty": "",
        "slashes": f"{root}//{adapter.name}///",
    }[kind]


def check_message(exc: AdapterError, top: Path, weights: bytes | None) -> None:
    msg = str(exc)
    assert MARKER.decode() not in msg and MARKER_AS_LENGTH not in msg, msg
    assert str(top) not in msg and "/proc/" not in msg, msg
    assert len(msg) < 2000, msg
    if weights is not None and len(weights) >= 8:
        (length,) = struct.unpack("<Q", weights[:8])
        if length > len(weights) - 8 and length > 10**6:  # a length that fits nothing is noise from the file
            assert str(length) not in msg, msg


def attempt(fn, top: Path, allowed: Path, weights: bytes | None):
    """Run fn() recording every open; only AdapterError may escape; every open lies under `allowed`."""
    with recording_reads() as opened:
        try:
            result = fn()
        except AdapterError as exc:
            check_message(exc, top, weights)
            result = None
    for real in opened:
        p = Path(real)
        assert p == allowed or allowed in p.parents, f"opened {real}, outside {allowed}"
    return result


def every_entry_point(top: Path, root: Path, lora_path: str, weights: bytes | None, direct: Path | None) -> None:
    registry = AdapterRegistry(ARCH, max_rank=8, allowed_roots=[root], reserved_names=["base"])
    where = attempt(lambda: registry.check_allowed(lora_path), top, root, weights)
    attempt(lambda: registry.add(None, "fz", lora_path, "admin"), top, root, weights)
    if where is not None:
        attempt(lambda: load_peft_adapter(where, ARCH, name="fz", max_rank=8), top, root, weights)
    if direct is not None:  # a directory named by the operator is its own root
        attempt(lambda: inspect_peft_adapter(direct, ARCH, name="fz", max_rank=8), top, direct, weights)
        attempt(lambda: load_peft_adapter(direct, ARCH, name="fz", max_rank=8), top, direct, weights)


# ------------------------------------------------------------------ the fuzz tests


@FUZZ
@given(config=config_bytes())
def test_fuzz_adapter_config(workdir, config):
    with world(workdir) as (top, root, outside):
        adapter = build_adapter(root, outside, "dir", config, VALID_WEIGHTS)
        every_entry_point(top, root, str(adapter), VALID_WEIGHTS, adapter)


@FUZZ
@given(weights=weights_bytes())
def test_fuzz_safetensors_header(workdir, weights):
    with world(workdir) as (top, root, outside):
        adapter = build_adapter(root, outside, "dir", json.dumps(VALID_CONFIG).encode(), weights)
        every_entry_point(top, root, str(adapter), weights, adapter)


@settings(FUZZ, max_examples=600)  # cheap cases, and a larger space of combinations
@given(dir_kind=st.sampled_from(DIR_KINDS), config_kind=st.sampled_from(FILE_KINDS),
       weights_kind=st.sampled_from(FILE_KINDS), path_kind=st.sampled_from(PATH_KINDS),
       weights=st.sampled_from([VALID_WEIGHTS, MARKER + VALID_WEIGHTS[8:]]))
def test_fuzz_links_and_paths(workdir, dir_kind, config_kind, weights_kind, path_kind, weights):
    with world(workdir) as (top, root, outside):
        adapter = build_adapter(root, outside, dir_kind, json.dumps(VALID_CONFIG).encode(), weights,
                                config_kind, weights_kind)
        direct = adapter if dir_kind == "dir" else None
        every_entry_point(top, root, path_text(path_kind, adapter, root, outside), weights, direct)


def test_the_audit_sees_reads_outside(workdir):
    """The checks above can fail: a plain read of the outside secret is caught."""
    with world(workdir) as (top, root, outside):
        with pytest.raises(AssertionError, match="outside"):
            attempt(lambda: (outside / "secret").read_bytes(), top, root, None)
        with pytest.raises(AssertionError, match="outside"):
            attempt(lambda: os.close(os.open(outside / "secret", os.O_RDONLY)), top, root, None)


def test_a_valid_adapter_loads_through_every_entry_point(workdir):
    with world(workdir) as (top, root, outside):
        adapter = build_adapter(root, outside, "dir", json.dumps(VALID_CONFIG).encode(), VALID_WEIGHTS)
        registry = AdapterRegistry(ARCH, max_rank=8, allowed_roots=[root])
        loaded = attempt(lambda: load_peft_adapter(registry.check_allowed(str(adapter)), ARCH, name="fz",
                                                   max_rank=8), top, root, VALID_WEIGHTS)
        assert loaded is not None and loaded.rank == 4 and len(loaded.modules) == ARCH.num_layers
        assert attempt(lambda: registry.add(None, "fz", str(adapter), "admin"), top, root, None) is not None
