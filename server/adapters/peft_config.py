"""`adapter_config.json` -> `LoraSpec`: which modules an adapter targets, with which rank and scale.

Semantics follow PEFT (checked against peft 0.21 `tuners_utils.check_target_module_exists`,
`utils.other.get_pattern_key` and `LoraModel._create_and_replace`). Module keys are
names inside the base model, e.g. `model.layers.3.self_attn.q_proj` (the checkpoint key
minus the `base_model.model.` prefix and the `.lora_A.weight` suffix).

* `target_modules` as a list: a key equal to an entry is targeted outright; a key
  ending with `"." + entry` is targeted subject to `layers_to_transform` (layer index =
  the first `<layers_pattern>.<digits>.` segment). As a string: `re.fullmatch`, and
  `layers_to_transform` / `layers_pattern` are forbidden. `"all-linear"`
  (any case) means every Linear except the output head: exactly the decoder projections
  the family registry lists for the base model. `None` means PEFT's per-model default
  (from the registry too; `q_proj`, `v_proj` for most families, none for Phi-3).
* `exclude_modules` (list: exact or dotted suffix; string: fullmatch) wins over targets.
* `rank_pattern` / `alpha_pattern`: each key is a regex matched as
  `re.match(rf"(.*\\.)?({key})$", module_key)`, i.e. it must match a whole dotted
  suffix of the module name. The FIRST key in file order that matches wins -- not the
  most specific one. Note PEFT writes adapter_config.json with `sort_keys=True`, so
  the file order is alphabetical, which can differ from the order used in training.
* scale = alpha / r, or alpha / sqrt(r) with `use_rslora`.
* `use_dora`: DoRA (a magnitude vector per module besides A and B; see dora.py).
* `fan_in_fan_out`: ignored, as PEFT ignores it on nn.Linear layers (the only kind served).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.model.families import family_named

from .errors import INVALID, UNSUPPORTED, AdapterError
from .regex_guard import compile_config_regex

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
MAX_PATTERN_ENTRIES = 10_000

# init_lora_weights values whose saved adapter is a plain LoRA delta on the unchanged base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# init_lora_weights values that rewrite the base weights during training (the saved
# adapter is only correct on that rewritten base unless converted to plain LoRA).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# Config fields that change the forward pass or add non-LoRA weights: refused when truthy.
_UNSUPPORTED_WHEN_SET = {
    "lora_bias": "a bias on lora_B is not served; only bias-free LoRA",
    "modules_to_save": "whole replacement modules are not served; only LoRA deltas",
    "layer_replication": "replicating layers changes the base model's layer stack",
    "target_parameters": "LoRA on raw nn.Parameters is not served",
    "trainable_token_indices": "trainable tokens modify the embedding matrix",
    "alora_invocation_tokens": "activated LoRA is not served",
    "use_qalora": "QA-LoRA is not served",
    "velora_config": "the VeLoRA variant is not served",
    "monteclora_config": "the MonteCLoRA variant is not served",
    "use_bdlora": "the BD-LoRA variant is not served",
    "arrow_config": "the Arrow routing variant is not served",
    "kasa_config": "the KaSA variant is not served",
}
# Fields we read, or know to be irrelevant at inference time.
_KNOWN_FIELDS = set(_UNSUPPORTED_WHEN_SET) | {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "use_dora", "fan_in_fan_out", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "bias",
    "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
}


@dataclass(frozen=True)
class _PatternEntry:
    key: str
    regex: re.Pattern[str]
    value: float


@dataclass(frozen=True, eq=False)
class LoraSpec:
    """What adapter_config.json says, validated; answers PEFT's per-module questions."""

    path: Path  # the adapter_config.json, for error messages
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool  # DoRA: every module has a lora_magnitude_vector
    target_list: tuple[str, ...] | None  # list form of target_modules (None when regex)
    target_regex: re.Pattern[str] | None  # string form, already fullmatch-ready
    exclude_list: tuple[str, ...] | None
    exclude_regex: re.Pattern[str] | None
    layers_to_transform: tuple[int, ...] | None  # None = all layers
    layers_patterns: tuple[re.Pattern[str], ...]  # index extractors; empty = PEFT's default
    rank_pattern: tuple[_PatternEntry, ...]
    alpha_pattern: tuple[_PatternEntry, ...]

    def targets(self, key: str) -> bool:
        """Would PEFT wrap the module named `key` (e.g. "model.layers.0.mlp.up_proj")?"""
        if self.exclude_regex is not None and self.exclude_regex.fullmatch(key):
            return False
        if self.exclude_list is not None and any(key == e or key.endswith("." + e) for e in self.exclude_list):
            return False
        if self.target_regex is not None:
            return self.target_regex.fullmatch(key) is not None
        assert self.target_list is not None
        if key in self.target_list:
            return True  # an exact full name bypasses layers_to_transform in PEFT
        if not any(key.endswith("." + t) for t in self.target_list):
            return False
        if self.layers_to_transform is None:
            return True
        index = self._layer_index(key)
        return index is not None and index in self.layers_to_transform

    def rank_for(self, key: str) -> int:
        """Configured rank of module `key` (rank_pattern first match, else r)."""
        return int(_first_match(self.rank_pattern, key, self.r))

    def rank_source(self, key: str) -> str:
        """Which config entry sets the rank of `key`, for error messages."""
        entry = next((e for e in self.rank_pattern if e.regex.match(key)), None)
        return f"rank_pattern[{entry.key!r}]" if entry is not None else "r"

    def alpha_for(self, key: str) -> float:
        """Configured lora_alpha of module `key` (alpha_pattern first match, else lora_alpha)."""
        return float(_first_match(self.alpha_pattern, key, self.lora_alpha))

    def scale_for(self, key: str) -> float:
        """The factor PEFT multiplies `B @ A @ x` by: alpha/r, or alpha/sqrt(r) (rsLoRA)."""
        r, alpha = self.rank_for(key), self.alpha_for(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def _layer_index(self, key: str) -> int | None:
        # Like PEFT: the FIRST numbered segment after a layers-pattern, not the last.
        patterns = self.layers_patterns or (_DEFAULT_LAYER_INDEX,)
        for pattern in patterns:
            match = pattern.match(key)
            if match is not None:
                return int(match.group("idx"))
        return None


_DEFAULT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def _first_match(entries: tuple[_PatternEntry, ...], key: str, default: float) -> float:
    for entry in entries:
        if entry.regex.match(key):
            return entry.value
    return default


def parse_lora_config(cfg: Mapping[str, Any], *, path: Path, model_type: str) -> LoraSpec:
    """Validate a raw adapter_config.json dict (from `path`) for a `model_type` base.

    Raises AdapterError: adapter_unsupported for PEFT features we do not serve,
    adapter_invalid for malformed or self-contradictory configs.
    """
    _check_peft_type(cfg, path)
    _check_unsupported_features(cfg, path)

    r = cfg.get("r", 8)
    if not _is_int(r) or r < 1:
        raise AdapterError(INVALID, f"r must be a positive integer, got {_show(r)}", path=path)
    alpha = cfg.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise AdapterError(INVALID, f"lora_alpha must be a finite number, got {_show(alpha)}", path=path)
    fan_in_fan_out = cfg.get("fan_in_fan_out")
    fan_in_fan_out = False if fan_in_fan_out is None else fan_in_fan_out  # null: PEFT's default
    if not isinstance(fan_in_fan_out, bool):
        raise AdapterError(INVALID, f"fan_in_fan_out must be true or false, got {_show(fan_in_fan_out)}", path=path)
    if fan_in_fan_out:
        # It transposes a Conv1D base weight only; every base layer served is an nn.Linear, for which
        # PEFT turns it off (with a warning), and LoRA's forward lora_B(lora_A(x)) never depended on it.
        log.info("%s: fan_in_fan_out=true ignored on Linear layers, as PEFT does", path)
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterError(INVALID, f"use_rslora must be true or false, got {_show(use_rslora)}", path=path)
    use_dora = cfg.get("use_dora")
    use_dora = False if use_dora is None else use_dora  # null: PEFT's default
    if not isinstance(use_dora, bool):
        raise AdapterError(INVALID, f"use_dora must be true or false, got {_show(use_dora)}", path=path)

    target_list, target_regex = _parse_targets(cfg.get("target_modules"), path, model_type)
    exclude_list, exclude_regex = _parse_excludes(cfg.get("exclude_modules"), path)
    # "all-linear" counts as a string here too: PEFT validates before expanding it.
    regex_targets = isinstance(cfg.get("target_modules"), str)
    layers, layer_patterns = _parse_layer_selection(cfg, path, regex_targets=regex_targets)

    return LoraSpec(
        path=path,
        r=int(r),
        lora_alpha=float(alpha),
        use_rslora=use_rslora,
        use_dora=use_dora,
        target_list=target_list,
        target_regex=target_regex,
        exclude_list=exclude_list,
        exclude_regex=exclude_regex,
        layers_to_transform=layers,
        layers_patterns=layer_patterns,
        rank_pattern=_parse_pattern(cfg.get("rank_pattern"), "rank_pattern", path, positive_int=True),
        alpha_pattern=_parse_pattern(cfg.get("alpha_pattern"), "alpha_pattern", path, positive_int=False),
    )


def _check_peft_type(cfg: Mapping[str, Any], path: Path) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise AdapterError(INVALID, "no peft_type: not a PEFT adapter config", path=path)
    if peft_type == "LORA":
        return
    hint = " (AdaLoRA: export it as a LoRA adapter with rank_pattern)" if peft_type == "ADALORA" else ""
    raise AdapterError(UNSUPPORTED, f"peft_type {_show(peft_type)} is not served, only 'LORA'{hint}", path=path)


def _check_unsupported_features(cfg: Mapping[str, Any], path: Path) -> None:
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterError(
            UNSUPPORTED, f"bias={_show(bias)} trains base-model biases; only bias=\"none\" is served", path=path
        )
    for field, reason in _UNSUPPORTED_WHEN_SET.items():
        if cfg.get(field):
            raise AdapterError(UNSUPPORTED, f"{field}={_show(cfg[field])}: {reason}", path=path)
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(
            UNSUPPORTED,
            f"init_lora_weights={_show(init)} rewrites the base weights during training; convert the adapter "
            "to plain LoRA (PEFT save_pretrained(path_initial_model_for_weight_conversion=...)) first",
            path=path,
        )
    if init not in _PLAIN_INITS:
        raise AdapterError(UNSUPPORTED, f"init_lora_weights={_show(init)} is not served", path=path)
    unknown = sorted(k for k, v in cfg.items() if k not in _KNOWN_FIELDS and v not in (None, False, [], {}, ""))
    if unknown:
        # PEFT itself drops unknown config keys with a warning; do the same, loudly.
        log.warning("%s: ignoring unknown adapter_config.json fields %s", path, unknown)


def _parse_targets(
    raw: Any, path: Path, model_type: str
) -> tuple[tuple[str, ...] | None, re.Pattern[str] | None]:
    family = family_named(model_type)
    if raw is None:
        default = family.peft_default_targets if family is not None else None
        if default is None:
            raise AdapterError(INVALID, "target_modules is null and there is no default for "
                               f"model type {model_type!r}", path=path)
        return default, None
    if isinstance(raw, str):
        if raw.lower() == ALL_LINEAR:
            # The decoder projections are all the Linear layers below lm_head (the excluded output head).
            if family is None:
                raise AdapterError(INVALID, f"all-linear has no meaning for model type {model_type!r}", path=path)
            return family.lora_targets, None
        return None, compile_config_regex(raw, what="target_modules", path=path)
    if isinstance(raw, list) and raw and all(isinstance(t, str) and t for t in raw):
        return tuple(raw), None
    raise AdapterError(INVALID, f"target_modules must be a non-empty list of names or a regex, got {_show(raw)}",
                       path=path)


def _parse_excludes(raw: Any, path: Path) -> tuple[tuple[str, ...] | None, re.Pattern[str] | None]:
    if raw is None or raw == [] or raw == "":
        return None, None
    if isinstance(raw, str):
        return None, compile_config_regex(raw, what="exclude_modules", path=path)
    if isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        return tuple(raw), None
    raise AdapterError(INVALID, f"exclude_modules must be a list of names or a regex, got {_show(raw)}", path=path)


def _parse_layer_selection(
    cfg: Mapping[str, Any], path: Path, *, regex_targets: bool
) -> tuple[tuple[int, ...] | None, tuple[re.Pattern[str], ...]]:
    layers = cfg.get("layers_to_transform")
    pattern = cfg.get("layers_pattern")
    if regex_targets and (layers is not None or pattern is not None):
        # PEFT's LoraConfig refuses this combination outright.
        raise AdapterError(INVALID, "layers_to_transform/layers_pattern cannot be combined with a regex "
                           "target_modules", path=path)
    if pattern and layers is None:
        raise AdapterError(INVALID, "layers_pattern is set but layers_to_transform is not", path=path)
    if _is_int(layers):
        layers = [layers]
    if layers is None or layers == []:
        selected = None  # PEFT: an empty list means "no restriction"
    elif isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers):
        selected = tuple(int(i) for i in layers)
    else:
        raise AdapterError(INVALID, f"layers_to_transform must be an int or a list of ints, got {_show(layers)}",
                           path=path)
    if selected is None or not pattern:
        return selected, ()
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AdapterError(INVALID, f"layers_pattern must be a string or a list of strings, got {_show(pattern)}",
                           path=path)
    compiled = tuple(
        compile_config_regex(
            p, what="layers_pattern", path=path, prefix=r"(?:^|.*?\.)", suffix=r"\.(?P<idx>\d+)\."
        )
        for p in patterns
    )
    return selected, compiled


def _parse_pattern(raw: Any, field: str, path: Path, *, positive_int: bool) -> tuple[_PatternEntry, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise AdapterError(INVALID, f"{field} must be an object, got {type(raw).__name__}", path=path)
    if len(raw) > MAX_PATTERN_ENTRIES:
        raise AdapterError(INVALID, f"{field} has {len(raw)} entries (max {MAX_PATTERN_ENTRIES})", path=path)
    entries = []
    for key, value in raw.items():  # file order matters: PEFT takes the first match
        ok = (_is_int(value) and value >= 1) if positive_int else _is_number(value)
        if not ok:
            want = "a positive integer" if positive_int else "a finite number"
            raise AdapterError(INVALID, f"{field}[{_show(key)}] must be {want}, got {_show(value)}", path=path)
        regex = compile_config_regex(key, what=f"{field} key", path=path, prefix=r"(.*\.)?(", suffix=r")$")
        entries.append(_PatternEntry(key=key, regex=regex, value=value))
    return tuple(entries)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _show(value: Any) -> str:
    """A config value for an error message: JSON, cut short (configs are untrusted and may be huge)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
