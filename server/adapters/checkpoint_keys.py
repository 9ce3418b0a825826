"""PEFT checkpoint tensor names -> (layer, projection, lora_A|lora_B|lora_magnitude_vector).

PEFT's `save_pretrained` writes `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`:
the `base_model.model.` wrapper prefix, the module's name inside the base model, and
the LoRA parameter with the adapter name removed. A DoRA adapter also has
`<module>.lora_magnitude_vector` (PEFT 0.21 drops the `.weight` of that one; with the adapter
name kept it is `<module>.lora_magnitude_vector.<name>.weight`). Other writers (Transformers' and
Diffusers' PEFT integrations, hand-made exports of `model.state_dict()`) drop the
wrapper prefix or keep the adapter name (`lora_A.default.weight`), and an adapter
trained on a bare decoder (`LlamaModel`) has no `model.` before `layers`. All of those are
accepted, as long as one file uses one naming consistently. Which projections exist, and in
which block (`self_attn` / `mlp`), is the family registry's (`ModelArch.lora_targets`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from server.model.families import BLOCK_OF

from .errors import UNSUPPORTED, AdapterError

PEFT_WRAPPER_PREFIX = "base_model.model."

MAGNITUDE = "lora_magnitude_vector"
_LORA_KEY = re.compile(
    r"(?P<wrapper>base_model\.model\.)?(?P<module>.+?)\."
    r"(?:(?P<kind>lora_A|lora_B)(?:\.(?P<infix>[^.]+))?\.weight"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.(?P<minfix>[^.]+)\.weight)?)"
)
# Canonical layer indices only: PEFT matches module names as strings, so "layers.01" is no layer.
_PROJECTION = re.compile(
    r"(?P<prefix>(?:model\.)?)layers\.(?P<layer>0|[1-9]\d*)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)"
)


@dataclass(frozen=True)
class LoraKey:
    """One LoRA tensor of the checkpoint, located in the base model."""

    tensor: str  # the checkpoint key, verbatim
    module_key: str  # the module's name inside the base model, e.g. "model.layers.0.mlp.up_proj"
    layer: int
    module: str  # one of the base model's lora_targets
    kind: str  # "lora_A" ([r, in]), "lora_B" ([out, r]) or MAGNITUDE ([out], DoRA)
    naming: tuple[bool, str, str | None]  # (has wrapper prefix, "model." or "", adapter-name infix)


def module_key(prefix: str, layer: int, module: str) -> str:
    """The base-model name of projection `module` of decoder layer `layer` ("" or "model." prefix)."""
    return f"{prefix}layers.{layer}.{BLOCK_OF[module]}.{module}"


def parse_lora_key(tensor: str, path: Path, targets: tuple[str, ...]) -> LoraKey:
    """Locate checkpoint key `tensor` (from file `path`); AdapterError(adapter_unsupported) if it is
    not the lora_A/lora_B weight (or DoRA magnitude) of one of the base model's decoder-layer
    projections `targets`."""
    match = _LORA_KEY.fullmatch(tensor)
    if match is None:
        raise AdapterError(UNSUPPORTED, _why_not_lora(tensor), path=path)
    module_name = match["module"]
    proj = _PROJECTION.fullmatch(module_name)
    if proj is None or proj["proj"] not in targets or BLOCK_OF[proj["proj"]] != proj["block"]:
        raise AdapterError(
            UNSUPPORTED,
            f"tensor {tensor!r} adapts module {module_name!r}; only LoRA on this base model's decoder "
            f"projections {', '.join(targets)} is served (not embed_tokens, lm_head, norms, ...)",
            path=path,
        )
    return LoraKey(
        tensor=tensor,
        module_key=module_name,
        layer=int(proj["layer"]),
        module=proj["proj"],
        kind=match["kind"] or MAGNITUDE,
        naming=(match["wrapper"] is not None, proj["prefix"], match["infix"] or match["minfix"]),
    )


def _why_not_lora(tensor: str) -> str:
    if "lora_embedding_" in tensor:
        return f"tensor {tensor!r} is LoRA on an embedding layer; only the decoder projections are served"
    if MAGNITUDE in tensor:
        return (f"tensor {tensor!r} looks like a DoRA magnitude vector under a name PEFT does not write "
                f"(expected '<module>.{MAGNITUDE}' or '<module>.{MAGNITUDE}.<adapter name>.weight')")
    if re.search(r"\.lora_[AB](\.[^.]+)?\.bias$", tensor):
        return f"tensor {tensor!r} is a LoRA bias (lora_bias=true); only bias-free LoRA is served"
    return (
        f"tensor {tensor!r} is not a LoRA weight (expected '<module>.lora_A.weight' / '.lora_B.weight'); "
        "full weights (modules_to_save, embed_tokens, lm_head, biases, norms) are not served"
    )
