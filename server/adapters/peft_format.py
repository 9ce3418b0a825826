"""Load a Hugging Face PEFT LoRA (or DoRA) adapter directory, validated against the base model.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`.
`load_peft_adapter` checks everything before returning (config flags, every tensor
name, dtype and shape, ranks against the config, layer indices, finiteness), so a
returned `LoraAdapter` is safe to copy into device slots as is; a refusal raises
`AdapterError` and leaves nothing behind. Pickle weights (`adapter_model.bin`) are
refused without being opened. A DoRA adapter (use_dora) is returned with its magnitudes; its
rescale needs the base weights and is computed by the caller (dora.with_dora_scales).

The LoRA delta of module m for input x [tokens, in] is `scale * (x @ a.T) @ b.T`,
[tokens, out], exactly PEFT's `lora_B(lora_A(x)) * scaling` (dropout off).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from server.model.arch import ModelArch

from .errors import INVALID, UNSUPPORTED, AdapterError
from .lora_weights import LoraAdapter, LoraModuleWeights
from .peft_config import LoraSpec, parse_lora_config
from .peft_header import ModuleKeys, check_header
from .prototypes import top_right_singular_vectors
from .safe_files import AdapterDir, OpenAdapterDir, read_limited
from .safetensors_file import load_tensors_fp32, read_header
from .store_layout import CONFIG_NAME, WEIGHTS_NAME, scan_adapter_store, validate_adapter_name

__all__ = [
    "AdapterError", "AdapterSummary", "LoraAdapter", "inspect_peft_adapter", "listed_summary", "load_peft_adapter",
    "parse_peft_adapter", "read_adapter_config", "scan_adapter_store", "validate_adapter_name",
    "DEFAULT_MAX_BYTES",
]

log = logging.getLogger(__name__)

# The largest |value| an adapter may put in the device pool (A, and B times its scale): float16's
# largest, so every pool dtype holds it, and products in the kernels stay far inside the float
# range. Trained LoRA weights are O(1) (the demo adapters' largest is 0.15). Past it the pool
# would hold infinities, and the dense mixture path's 0 * inf (an expert a token does not use)
# is NaN in other requests of the step.
MAX_SERVED_VALUE = float(torch.finfo(torch.float16).max)
DEFAULT_MAX_BYTES = 2 * 1024**3  # 2 GiB: a rank-64 all-linear adapter of a 70B model is ~1.7 GB in fp16
MAX_CONFIG_BYTES = 4 * 1024**2  # a 10k-entry rank_pattern fits comfortably
# Weight files PEFT (or torch) may write that we never open: all are pickle or unknown.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf", ".h5", ".msgpack")


def read_adapter_config(path: Path | AdapterDir) -> dict:
    """The raw adapter_config.json of adapter directory `path`, parsed but not interpreted.

    Cheap (no weights are read): for listing adapters. AdapterError: adapter_not_found
    if `path` is not a directory; adapter_invalid if the config is missing, a symlink,
    too large, or not a JSON object.
    """
    with OpenAdapterDir(_where(path)) as files:
        return _read_config(files)


def _where(path: Path | str | AdapterDir) -> AdapterDir:
    return path if isinstance(path, AdapterDir) else AdapterDir.own_root(path)


def _read_config(files: OpenAdapterDir) -> dict:
    config_file = files.where.path / CONFIG_NAME
    fd = files.open_file(CONFIG_NAME)
    if fd is None:
        raise AdapterError(INVALID, f"no {CONFIG_NAME}: not a PEFT adapter directory", path=files.where.path)
    try:
        raw = read_limited(fd, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterError(INVALID, f"cannot read ({exc.strerror or type(exc).__name__})", path=config_file) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(INVALID, f"larger than {MAX_CONFIG_BYTES} bytes", path=config_file)
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterError(INVALID, "invalid JSON: not UTF-8", path=config_file) from None
    except RecursionError:
        raise AdapterError(INVALID, "invalid JSON: nested too deeply", path=config_file) from None
    except ValueError as exc:  # JSONDecodeError.msg names the problem without quoting the file
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "unreadable"
        raise AdapterError(INVALID, f"invalid JSON: {why}", path=config_file) from None
    if not isinstance(cfg, dict):
        raise AdapterError(INVALID, f"expected a JSON object, got {type(cfg).__name__}", path=config_file)
    return cfg


@dataclass(frozen=True)
class AdapterSummary:
    """What `inspect_peft_adapter` learns from the config and the safetensors header alone.

    A store adapter is registered from the directory listing only (`listed_summary`: nothing
    read, `inspected` False, rank/target_modules/num_params None) and gets its full summary
    at its first successful load."""

    name: str
    where: AdapterDir
    rank: int | None  # max rank over modules
    target_modules: tuple[str, ...] | None  # projections present, in the model's lora_targets order
    num_params: int | None
    file_bytes: int  # size of adapter_model.safetensors on disk
    base_model_name_or_path: str | None
    inspected: bool = True
    use_dora: bool | None = None  # DoRA (PEFT use_dora); None: listed, not read yet
    # the files read (OpenAdapterDir.identity); None: listed, not read yet. A version is one set of
    # files: a later load that finds others is refused (host_cache), never served under its name.
    files_id: tuple[int, ...] | None = None


def listed_summary(where: AdapterDir, name: str) -> AdapterSummary:
    """A summary from one stat, no file opened: for registering thousands of adapters at startup.
    The adapter is validated in full by its first load (`load_peft_adapter`), which fails only
    its own requests if it is bad."""
    try:
        file_bytes = (where.path / WEIGHTS_NAME).stat().st_size
    except OSError:
        file_bytes = 0  # missing or unreadable: its load will say so
    return AdapterSummary(name=name, where=where, rank=None, target_modules=None, num_params=None,
                          file_bytes=file_bytes, base_model_name_or_path=None, inspected=False)


@dataclass(frozen=True)
class _Plan:
    summary: AdapterSummary
    spec: LoraSpec
    weights_file: Path  # for messages
    weights_fd: int  # open while the plan's OpenAdapterDir is
    pairs: Mapping[tuple[int, str], ModuleKeys]


def _plan(files: OpenAdapterDir, arch: ModelArch, name: str, max_rank: int, max_bytes: int) -> _Plan:
    cfg = _read_config(files)
    spec = parse_lora_config(cfg, path=files.where.path / CONFIG_NAME, model_type=arch.model_type)
    weights_file = files.where.path / WEIGHTS_NAME
    weights_fd = _weights_fd(files)
    header = read_header(weights_fd, max_bytes=max_bytes, path=weights_file)

    base = cfg.get("base_model_name_or_path")
    pairs = check_header(header, spec, arch, base=base, max_rank=max_rank, path=weights_file)

    present = {module for _, module in pairs}
    num_params = sum(_numel(header[key.tensor].shape) for k in pairs.values() for key in k.all())
    summary = AdapterSummary(
        name=name, where=files.where, rank=max(header[k.a.tensor].shape[0] for k in pairs.values()),
        target_modules=tuple(m for m in arch.lora_targets if m in present), num_params=num_params,
        file_bytes=os.fstat(weights_fd).st_size, base_model_name_or_path=base if isinstance(base, str) else None,
        use_dora=spec.use_dora, files_id=files.identity(),
    )
    return _Plan(summary, spec, weights_file, weights_fd, pairs)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def inspect_peft_adapter(
    path: Path | str | AdapterDir, arch: ModelArch, *, name: str, max_rank: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> AdapterSummary:
    """Every check `load_peft_adapter` makes except reading tensor data (so no NaN/Inf check):
    cheap enough to run on every adapter of a store at startup. Raises AdapterError."""
    validate_adapter_name(name)
    with OpenAdapterDir(_where(path)) as files:
        return _plan(files, arch, name, max_rank, max_bytes).summary


def load_peft_adapter(
    path: Path | str | AdapterDir, arch: ModelArch, *, name: str, max_rank: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> LoraAdapter:
    """Parse and validate the PEFT LoRA adapter in directory `path` for base model `arch`.

    `max_rank` is the server's slot rank; `max_bytes` caps the weights file size.
    Raises AdapterError (see errors.py for the codes); on success every module's
    `a` is [r, in] and `b` is [out, r] with (in, out) == arch.linear_shape(module), its
    routing `prototype` [in] is computed, and a DoRA adapter's `magnitude` is [out] (its
    `dora_scale` is not computed here: dora.with_dora_scales, with the base weights).
    """
    return parse_peft_adapter(path, arch, name=name, max_rank=max_rank, max_bytes=max_bytes)[1]


def parse_peft_adapter(
    path: Path | str | AdapterDir, arch: ModelArch, *, name: str, max_rank: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[AdapterSummary, LoraAdapter]:
    """`load_peft_adapter`, also returning what `inspect_peft_adapter` would: one parse for both."""
    validate_adapter_name(name)
    with OpenAdapterDir(_where(path)) as files:
        plan = _plan(files, arch, name, max_rank, max_bytes)
        # Everything checkable from the header passed: only now read tensor data, from the same file.
        names = [key.tensor for k in plan.pairs.values() for key in k.all()]
        tensors = load_tensors_fp32(plan.weights_fd, names, plan.weights_file)
    for tensor_name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(INVALID, f"tensor {tensor_name!r} has {bad} NaN/Inf values (after float32 "
                               "conversion)", path=plan.weights_file)

    keys = sorted(plan.pairs, key=lambda lm: (lm[0], arch.lora_targets.index(lm[1])))
    ab = [(tensors[plan.pairs[key].a.tensor], tensors[plan.pairs[key].b.tensor]) for key in keys]
    scales = [plan.spec.scale_for(plan.pairs[key].a.module_key) for key in keys]
    for key, (a, b), scale in zip(keys, ab, scales):
        _check_served_range(plan.pairs[key], a, b, scale, plan)
        if (mag := plan.pairs[key].magnitude) is not None:
            _check_magnitude_range(mag.tensor, tensors[mag.tensor], plan)
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    for key, (a, b), scale, prototype in zip(keys, ab, scales, top_right_singular_vectors(ab)):
        k = plan.pairs[key]
        modules[key] = LoraModuleWeights(
            a=a, b=b, scale=scale, prototype=prototype,
            magnitude=tensors[k.magnitude.tensor] if k.magnitude is not None else None,
        )
    s = plan.summary
    return s, LoraAdapter(modules=MappingProxyType(modules), target_modules=s.target_modules, rank=s.rank,
                          num_params=s.num_params, nbytes=sum(w.nbytes for w in modules.values()),
                          use_dora=plan.spec.use_dora)


def _check_served_range(k: ModuleKeys, a: torch.Tensor, b: torch.Tensor, scale: float, plan: _Plan) -> None:
    """AdapterError unless A and scale * B (what the pool holds) are within MAX_SERVED_VALUE."""
    largest_a = float(a.abs().max()) if a.numel() else 0.0
    if largest_a > MAX_SERVED_VALUE:
        raise AdapterError(INVALID, f"tensor {k.a.tensor!r} reaches {largest_a:.3g}; lora_A values must be at "
                           f"most {MAX_SERVED_VALUE:g} in magnitude", path=plan.weights_file)
    largest_b = float(b.abs().max()) if b.numel() else 0.0
    # the scale alone too: the pool multiplies B by it in float32, and 0 * inf is NaN
    if abs(scale) > MAX_SERVED_VALUE or largest_b * abs(scale) > MAX_SERVED_VALUE:
        source = "alpha_pattern" if any(e.regex.match(k.a.module_key) for e in plan.spec.alpha_pattern) \
            else "lora_alpha"
        raise AdapterError(INVALID, f"{k.a.module_key}: lora_B * scale reaches {largest_b * abs(scale):.3g} (scale "
                           f"{scale:.3g} from {source} and {plan.spec.rank_source(k.a.module_key)}); served "
                           f"values must be at most {MAX_SERVED_VALUE:g} in magnitude",
                           path=plan.spec.path)


def _check_magnitude_range(name: str, magnitude: torch.Tensor, plan: _Plan) -> None:
    """AdapterError unless a DoRA magnitude [out] is within MAX_SERVED_VALUE: it multiplies every
    output of its module, in the pool's dtype as the rest of the adapter."""
    largest = float(magnitude.abs().max()) if magnitude.numel() else 0.0
    if largest > MAX_SERVED_VALUE:
        raise AdapterError(INVALID, f"tensor {name!r} reaches {largest:.3g}; DoRA magnitudes must be at most "
                           f"{MAX_SERVED_VALUE:g}", path=plan.weights_file)


def _weights_fd(files: OpenAdapterDir) -> int:
    """The open adapter_model.safetensors; other weight files (pickle, ...) are named, never opened."""
    fd = files.open_file(WEIGHTS_NAME)
    others = sorted(n for n in files.names() if n.startswith("adapter_model") and n != WEIGHTS_NAME
                    and n.endswith(_OTHER_WEIGHT_SUFFIXES))
    if fd is not None:
        for other in others:
            log.warning("%s: ignoring %s (never opened); using %s", files.where.path, other, WEIGHTS_NAME)
        return fd
    if others:
        raise AdapterError(
            UNSUPPORTED,
            f"weights are in {', '.join(others)}, not {WEIGHTS_NAME}; pickle/other formats are never loaded (they "
            "can run code): re-save with safetensors (PEFT save_pretrained(safe_serialization=True))",
            path=files.where.path,
        )
    raise AdapterError(INVALID, f"no {WEIGHTS_NAME}", path=files.where.path)
