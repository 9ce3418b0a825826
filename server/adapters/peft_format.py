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
from typing import Any

import torch

from server.model.arch import ModelArch

from .checkpoint_keys import MAGNITUDE, PEFT_WRAPPER_PREFIX, LoraKey, module_key, parse_lora_key
from .errors import INCOMPATIBLE, INVALID, UNSUPPORTED, AdapterError
from .lora_weights import LoraAdapter, LoraModuleWeights
from .peft_config import LoraSpec, parse_lora_config
from .prototypes import top_right_singular_vectors
from .safe_files import AdapterDir, OpenAdapterDir, read_limited
from .safetensors_file import TensorInfo, load_tensors_fp32, read_header
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
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
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
class _ModuleKeys:
    """The checkpoint tensors of one adapted module."""

    a: LoraKey
    b: LoraKey
    magnitude: LoraKey | None  # DoRA only

    def all(self) -> tuple[LoraKey, ...]:
        return (self.a, self.b) if self.magnitude is None else (self.a, self.b, self.magnitude)


@dataclass(frozen=True)
class _Plan:
    summary: AdapterSummary
    spec: LoraSpec
    weights_file: Path  # for messages
    weights_fd: int  # open while the plan's OpenAdapterDir is
    pairs: Mapping[tuple[int, str], _ModuleKeys]


def _plan(files: OpenAdapterDir, arch: ModelArch, name: str, max_rank: int, max_bytes: int) -> _Plan:
    cfg = _read_config(files)
    spec = parse_lora_config(cfg, path=files.where.path / CONFIG_NAME, model_type=arch.model_type)
    weights_file = files.where.path / WEIGHTS_NAME
    weights_fd = _weights_fd(files)
    header = read_header(weights_fd, max_bytes=max_bytes, path=weights_file)

    keys = _parse_keys(header, weights_file, arch.lora_targets)
    pairs = _pair_up(keys, weights_file)
    base = cfg.get("base_model_name_or_path")
    # Shapes first, for all modules: "made for another base model" is the most useful diagnosis.
    for (layer, module), k in pairs.items():
        _check_shapes(layer, module, header[k.a.tensor], header[k.b.tensor], arch, base, weights_file)
    for k in pairs.values():
        _check_rank(k.a, header[k.a.tensor].shape[0], spec, max_rank, weights_file)
    _check_against_config(pairs, spec, arch, weights_file)
    _check_dora(pairs, header, spec, arch, weights_file)

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


def _check_served_range(k: _ModuleKeys, a: torch.Tensor, b: torch.Tensor, scale: float, plan: _Plan) -> None:
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


def _parse_keys(header: Mapping[str, TensorInfo], path: Path, targets: tuple[str, ...]) -> list[LoraKey]:
    if not header:
        raise AdapterError(INVALID, "no tensors: the adapter holds no LoRA weights", path=path)
    keys = [parse_lora_key(name, path, targets) for name in sorted(header)]
    namings = {k.naming for k in keys}
    if len(namings) > 1:
        shown = ", ".join(sorted(_naming_template(n) for n in namings))
        raise AdapterError(INVALID, f"tensor names mix naming schemes: {shown}", path=path)
    for key in keys:
        dtype = header[key.tensor].dtype
        if dtype not in FLOAT_DTYPES:
            code = UNSUPPORTED if dtype.startswith("F") else INVALID
            raise AdapterError(code, f"tensor {key.tensor!r} has dtype {dtype}; LoRA weights must be one of "
                               f"{', '.join(FLOAT_DTYPES)}", path=path)
    return keys


def _naming_template(naming: tuple[bool, str, str | None]) -> str:
    wrapper, prefix, infix = naming
    head = PEFT_WRAPPER_PREFIX if wrapper else ""
    tail = f".{infix}" if infix else ""
    return f"'{head}{prefix}layers.N.*.lora_A{tail}.weight'"


def _pair_up(keys: list[LoraKey], path: Path) -> dict[tuple[int, str], _ModuleKeys]:
    by_slot: dict[tuple[int, str], dict[str, LoraKey]] = {}
    for key in keys:
        slot = by_slot.setdefault((key.layer, key.module), {})
        if key.kind in slot:  # defensive: one naming scheme and unique header keys make this unreachable
            raise AdapterError(INVALID, f"tensors {slot[key.kind].tensor!r} and {key.tensor!r} are the same "
                               "LoRA weight", path=path)
        slot[key.kind] = key
    pairs = {}
    for (layer, module), slot in by_slot.items():
        if not {"lora_A", "lora_B"} <= set(slot):
            have = next(iter(slot.values()))
            missing = " and ".join(k for k in ("lora_A", "lora_B") if k not in slot)
            raise AdapterError(INVALID, f"{have.tensor!r} has no matching {missing} tensor", path=path)
        pairs[(layer, module)] = _ModuleKeys(slot["lora_A"], slot["lora_B"], slot.get(MAGNITUDE))
    return pairs


def _check_shapes(
    layer: int, module: str, a: TensorInfo, b: TensorInfo, arch: ModelArch, base: Any, path: Path
) -> None:
    where = f"layer {layer} {module}"
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise AdapterError(INVALID, f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} must be 2-D",
                           path=path)
    # A config written from a local checkout names an absolute path: show its last component only.
    shown_base = Path(base).name if isinstance(base, str) and os.path.isabs(base) else base
    trained_on = f" (adapter trained on {shown_base!r})" if base else ""
    if layer >= arch.num_layers:
        raise AdapterError(INCOMPATIBLE, f"{where}: the base model has only {arch.num_layers} layers"
                           f"{trained_on}", path=path)
    want_in, want_out = arch.linear_shape(module)
    (r_a, got_in), (got_out, r_b) = a.shape, b.shape
    if got_in != want_in or got_out != want_out:
        raise AdapterError(
            INCOMPATIBLE,
            f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} adapt a {got_in}->{got_out} linear, "
            f"but this base model's {module} is {want_in}->{want_out}: made for another base model{trained_on}",
            path=path,
        )
    if r_a != r_b:
        raise AdapterError(INVALID, f"{where}: lora_A has rank {r_a} but lora_B has rank {r_b}", path=path)


def _check_rank(key: LoraKey, rank: int, spec: LoraSpec, max_rank: int, path: Path) -> None:
    configured = spec.rank_for(key.module_key)
    if rank != configured:
        raise AdapterError(
            INVALID,
            f"{key.module_key}: weights have rank {rank} but adapter_config.json gives {configured} "
            f"(from {spec.rank_source(key.module_key)}); PEFT would refuse to load it too",
            path=path,
        )
    if rank > max_rank:
        raise AdapterError(UNSUPPORTED, f"{key.module_key}: rank {rank} exceeds this server's max_rank "
                           f"{max_rank}", path=path)


def _check_against_config(
    pairs: Mapping[tuple[int, str], _ModuleKeys], spec: LoraSpec, arch: ModelArch, path: Path
) -> None:
    """The weights must cover exactly the modules PEFT would wrap under this config.

    PEFT silently ignores unexpected tensors and leaves missing ones at their init
    (a zero delta); either means the files do not belong together, so refuse.
    """
    for k in pairs.values():
        if not spec.targets(k.a.module_key):
            raise AdapterError(INVALID, f"has weights for {k.a.module_key}, which adapter_config.json "
                               "(target_modules / layers_to_transform / exclude_modules) does not target",
                               path=path)
    prefix = next(iter(pairs.values())).a.naming[1]
    missing = [
        (layer, module)
        for layer in range(arch.num_layers)
        for module in arch.lora_targets
        if (layer, module) not in pairs and spec.targets(module_key(prefix, layer, module))
    ]
    if not missing:
        return
    shown = ", ".join(module_key(prefix, layer, module) for layer, module in missing[:4])
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    top = max(layer for layer, _ in pairs)
    if all(layer > top for layer, _ in missing):
        # Every layer the weights cover is complete; they just stop early.
        raise AdapterError(INCOMPATIBLE, f"weights stop at layer {top} but this base model has "
                           f"{arch.num_layers} layers (missing {shown}{more}): made for a shallower model",
                           path=path)
    raise AdapterError(INVALID, f"adapter_config.json targets {shown}{more}, which have no weights", path=path)



def _check_dora(pairs: Mapping[tuple[int, str], _ModuleKeys], header: Mapping[str, TensorInfo], spec: LoraSpec,
                arch: ModelArch, path: Path) -> None:
    """A DoRA adapter (use_dora) has a magnitude [out] for every module it adapts, a plain one none."""
    for (layer, module), k in sorted(pairs.items()):
        if k.magnitude is None:
            if spec.use_dora:
                raise AdapterError(INVALID, f"adapter_config.json sets use_dora but {k.a.module_key} has no "
                                   f"{MAGNITUDE} tensor (DoRA needs one per adapted module)", path=path)
            continue
        if not spec.use_dora:
            raise AdapterError(INVALID, f"tensor {k.magnitude.tensor!r} is a DoRA magnitude vector but "
                               "adapter_config.json does not set use_dora", path=path)
        shape = list(header[k.magnitude.tensor].shape)
        want = arch.linear_shape(module)[1]
        if shape != [want]:
            raise AdapterError(INVALID, f"layer {layer} {module}: DoRA {MAGNITUDE} has shape {shape}; this "
                               f"module's magnitude is [{want}] (one per output feature)", path=path)
