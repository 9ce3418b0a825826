"""Read a `.safetensors` file defensively: the header first (cheap), tensors only after validation.

Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header
length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}}`
(offsets relative to the data section, in bytes), then the data section. We check the
header ourselves before touching any tensor so that a hostile or truncated file is
refused with a precise message (which tensor points past the end, by how much), and
`safetensors.safe_open` validates again when tensors are read.

`safe_open` memory-maps the file: whoever writes the store must replace adapter
files atomically (write elsewhere, then rename), since truncating a mapped file
mid-read faults the process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from .errors import INVALID, UNSUPPORTED, AdapterError
from .safe_files import fd_path, read_limited

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_NAME_CHARS = 512  # PEFT keys are ~80 characters
# Bytes per element for the dtypes whose size is a whole number of bytes.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. `shape` in elements, `nbytes` = size of its data in bytes."""

    name: str
    dtype: str  # safetensors dtype code, e.g. "F32", "BF16", "I64"
    shape: tuple[int, ...]
    nbytes: int


def read_header(fd: int, *, max_bytes: int, path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of the file open as `fd` (named `path` in messages); no tensor data
    is read.

    Raises AdapterError: adapter_unsupported if the file exceeds `max_bytes`;
    adapter_invalid if it is truncated, the header is not valid JSON, offsets are
    inconsistent with shapes, or any tensor's data lies past the end of the file.
    Messages never quote the file's bytes (it may not be a safetensors file at all).
    """
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise AdapterError(UNSUPPORTED, f"file is over the adapter size cap of {max_bytes} bytes", path=path)
        prefix = os.pread(fd, 8, 0) if size >= 8 else b""
        if len(prefix) < 8:
            raise AdapterError(INVALID, "truncated safetensors file (no header)", path=path)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise AdapterError(INVALID, "corrupt or truncated safetensors file: its header length does not "
                               "fit in the file", path=path)
        raw = os.pread(fd, header_len, 8)
    except OSError as exc:
        raise AdapterError(INVALID, f"cannot read safetensors file ({exc.strerror or type(exc).__name__})",
                           path=path) from None
    if len(raw) != header_len:  # shrank while we read
        raise AdapterError(INVALID, "truncated safetensors file", path=path)
    header = _parse_json(raw, path)
    return _validate_entries(header, data_size=size - 8 - header_len, path=path)


def load_tensors_fp32(fd: int, names: list[str], path: Path) -> dict[str, torch.Tensor]:
    """Tensors `names` from the file open as `fd` as contiguous float32 CPU tensors.

    Reads through `fd` itself (via /proc/self/fd where there is one, else by reading the
    file into memory), never by name, so the file checked is the file read. Any library
    error means an unreadable file and becomes AdapterError(adapter_invalid); its text
    (which may quote the file) goes to the server log only.
    """
    out: dict[str, torch.Tensor] = {}
    try:
        source = fd_path(fd)
        if source is None:
            os.lseek(fd, 0, os.SEEK_SET)
            tensors = safetensors.torch.load(read_limited(fd, os.fstat(fd).st_size))
            return {name: tensors[name].to(torch.float32).contiguous() for name in names}
        with safe_open(source, framework="pt", device="cpu") as f:
            for name in names:
                out[name] = f.get_tensor(name).to(torch.float32).contiguous()
    except Exception as exc:
        log.info("%s: the safetensors library refused it: %s", path, exc)
        raise AdapterError(INVALID, "corrupt safetensors file (tensor data unreadable)", path=path) from None
    return out


def _parse_json(raw: bytes, path: Path) -> dict:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate keys in header")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError:
        raise AdapterError(INVALID, "corrupt safetensors header (not UTF-8)", path=path) from None
    except RecursionError:
        raise AdapterError(INVALID, "corrupt safetensors header (nested too deeply)", path=path) from None
    except ValueError as exc:  # JSONDecodeError.msg names the problem, not the bytes
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise AdapterError(INVALID, f"corrupt safetensors header (not valid JSON: {why})", path=path) from None
    if not isinstance(header, dict):
        raise AdapterError(INVALID, "corrupt safetensors header (not a JSON object)", path=path)
    return header


def _validate_entries(header: dict, *, data_size: int, path: Path) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if len(name) > MAX_NAME_CHARS:  # bounds every later message that names a tensor
            raise AdapterError(INVALID, f"corrupt safetensors header: a tensor name is longer than "
                               f"{MAX_NAME_CHARS} characters", path=path)
        bad = f"corrupt safetensors header entry {name!r}"
        if not isinstance(entry, dict):
            raise AdapterError(INVALID, f"{bad}: not an object", path=path)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or not 0 < len(dtype) <= 16:
            raise AdapterError(INVALID, f"{bad}: missing or malformed dtype", path=path)
        if not (isinstance(shape, list) and all(_nonneg_int(d) for d in shape)):
            raise AdapterError(INVALID, f"{bad}: bad shape {_show(shape)}", path=path)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nonneg_int(o) for o in offsets)):
            raise AdapterError(INVALID, f"{bad}: bad data_offsets {_show(offsets)}", path=path)
        begin, end = offsets
        if begin > end:
            raise AdapterError(INVALID, f"{bad}: data_offsets {offsets} are reversed", path=path)
        if end > data_size:
            raise AdapterError(
                INVALID,
                f"truncated or corrupt safetensors: tensor {name!r} data ends at byte {end} of the data "
                f"section, past the end of the file ({data_size} data bytes)",
                path=path,
            )
        itemsize = DTYPE_BYTES.get(dtype)
        if itemsize is not None and math.prod(shape) * itemsize != end - begin:
            raise AdapterError(
                INVALID, f"{bad}: shape {shape} of {dtype} needs {math.prod(shape) * itemsize} bytes, "
                f"data_offsets span {end - begin}", path=path
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), nbytes=end - begin)
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise AdapterError(INVALID, f"corrupt safetensors header: tensors {n0!r} and {n1!r} overlap",
                               path=path)
    return infos


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _nonneg_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
