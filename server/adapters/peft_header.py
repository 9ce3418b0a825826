"""What a PEFT adapter's safetensors header must satisfy before any tensor data is read.

`check_header` pairs every tensor name into one `ModuleKeys` per adapted module and checks
names, dtypes, shapes against the base model, ranks against adapter_config.json, coverage
of exactly the modules the config targets, and DoRA magnitudes. Every refusal is an
`AdapterError` naming the file and the module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.model.arch import ModelArch

from .checkpoint_keys import MAGNITUDE, PEFT_WRAPPER_PREFIX, LoraKey, module_key, parse_lora_key
from .errors import INCOMPATIBLE, INVALID, UNSUPPORTED, AdapterError
from .peft_config import LoraSpec
from .safetensors_file import TensorInfo

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class ModuleKeys:
    """The checkpoint tensors of one adapted module."""

    a: LoraKey
    b: LoraKey
    magnitude: LoraKey | None  # DoRA only

    def all(self) -> tuple[LoraKey, ...]:
        return (self.a, self.b) if self.magnitude is None else (self.a, self.b, self.magnitude)


def check_header(header: Mapping[str, TensorInfo], spec: LoraSpec, arch: ModelArch, *, base: Any,
                 max_rank: int, path: Path) -> dict[tuple[int, str], ModuleKeys]:
    """The adapted modules, {(layer, module): ModuleKeys}, once every header check passed.

    `base` is the config's base_model_name_or_path (for messages); `max_rank` the server's slot
    rank. Raises AdapterError."""
    pairs = _pair_up(_parse_keys(header, path, arch.lora_targets), path)
    # Shapes first, for all modules: "made for another base model" is the most useful diagnosis.
    for (layer, module), k in pairs.items():
        _check_shapes(layer, module, header[k.a.tensor], header[k.b.tensor], arch, base, path)
    for k in pairs.values():
        _check_rank(k.a, header[k.a.tensor].shape[0], spec, max_rank, path)
    _check_against_config(pairs, spec, arch, path)
    _check_dora(pairs, header, spec, arch, path)
    return pairs


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


def _pair_up(keys: list[LoraKey], path: Path) -> dict[tuple[int, str], ModuleKeys]:
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
        pairs[(layer, module)] = ModuleKeys(slot["lora_A"], slot["lora_B"], slot.get(MAGNITUDE))
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
    pairs: Mapping[tuple[int, str], ModuleKeys], spec: LoraSpec, arch: ModelArch, path: Path
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


def _check_dora(pairs: Mapping[tuple[int, str], ModuleKeys], header: Mapping[str, TensorInfo], spec: LoraSpec,
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
