"""What the adapter parser refuses, each with a clear error naming the problem: broken or
hostile files, non-finite or mis-shaped weights, and configs it cannot serve exactly.
Every case is crafted from a real PEFT-made adapter (tests/adapter_files.py)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import save_file

from adapter_files import CONFIG, LLAMA, TINY, WEIGHTS, Base, edit_config, edit_weights, load, make_adapter, refused

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- refusals: files


def test_missing_dir(tmp_path):
    refused(tmp_path / "nope", "adapter_not_found", "nope", "no such adapter directory")


def test_missing_config(adapter):
    (adapter / CONFIG).unlink()
    refused(adapter, "adapter_invalid", "adapter_config.json")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff"])
def test_bad_config_json(adapter, text):
    (adapter / CONFIG).write_bytes(text.encode("latin-1"))
    refused(adapter, "adapter_invalid", "adapter_config.json")


class _Boom:
    """Unpickling this creates a marker file: proof that a .bin was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_weights_are_never_opened(adapter, tmp_path):
    marker = tmp_path / "unpickled"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Boom(marker)}))
    load(adapter)  # safetensors present: the .bin is ignored, never read
    (adapter / WEIGHTS).unlink()
    refused(adapter, "adapter_unsupported", "adapter_model.bin", "pickle")
    assert not marker.exists()


def test_no_weights_at_all(adapter):
    (adapter / WEIGHTS).unlink()
    refused(adapter, "adapter_invalid", WEIGHTS)


@pytest.mark.parametrize("cut", [100, 1, "header"])
def test_truncated_safetensors(adapter, cut):
    data = (adapter / WEIGHTS).read_bytes()
    end = 8 + struct.unpack("<Q", data[:8])[0] - 10 if cut == "header" else len(data) - cut
    (adapter / WEIGHTS).write_bytes(data[:end])
    refused(adapter, "adapter_invalid", WEIGHTS, "truncated")


def _rewrite_header(path: Path, fn) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = fn(json.loads(data[8:8 + n]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_header_pointing_past_end_of_file(adapter):
    def grow_last(header):
        name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        entry = header[name]
        entry["shape"][0] += 1000  # consistent with the offsets, but past EOF
        entry["data_offsets"][1] += 1000 * entry["shape"][1] * 4
        return header
    _rewrite_header(adapter / WEIGHTS, grow_last)
    refused(adapter, "adapter_invalid", WEIGHTS, "past the end")


def test_corruption_found_by_safetensors_itself_is_wrapped(adapter):
    with open(adapter / WEIGHTS, "ab") as fh:  # trailing bytes: our header check passes, the library's fails
        fh.write(b"\0" * 64)
    refused(adapter, "adapter_invalid", WEIGHTS, "corrupt safetensors")


def test_garbage_file(adapter):
    (adapter / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    refused(adapter, "adapter_invalid", WEIGHTS, "not valid JSON")


def test_size_cap(adapter):
    refused(adapter, "adapter_unsupported", WEIGHTS, "size cap", max_bytes=1000)


# ---------------------------------------------------------------- refusals: tensors

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(adapter, bad):
    def poison(t):
        t[B0][3, 1] = bad
        return t
    edit_weights(adapter, poison)
    refused(adapter, "adapter_invalid", B0, "NaN/Inf")


def test_float64_overflowing_float32_is_caught(adapter):
    edit_weights(adapter, lambda t: {**t, A0: t[A0].double() * 1e300})  # finite in the file, inf as fp32
    refused(adapter, "adapter_invalid", A0, "NaN/Inf")


def test_lora_a_without_lora_b(adapter):
    edit_weights(adapter, lambda t: {k: v for k, v in t.items() if k != B0})
    refused(adapter, "adapter_invalid", A0, "no matching lora_B")


def test_integer_tensor(adapter):
    edit_weights(adapter, lambda t: {**t, A0: (t[A0] * 100).to(torch.int32)})
    refused(adapter, "adapter_invalid", A0, "I32")


def test_no_lora_tensors(adapter):
    save_file({}, str(adapter / WEIGHTS))
    refused(adapter, "adapter_invalid", "no tensors")


@pytest.mark.parametrize("extra", ["base_model.model.model.norm.weight", "base_model.model.lm_head.weight",
                                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"])
def test_non_lora_tensor_in_file(adapter, extra):
    edit_weights(adapter, lambda t: {**t, extra: torch.zeros(64)})
    refused(adapter, "adapter_unsupported", extra)


@pytest.mark.parametrize("targets,needle", [(["q_proj", "embed_tokens"], "embed"),
                                            (["v_proj", "lm_head"], "lm_head")])
def test_peft_adapter_on_embeddings_or_head(tmp_path, targets, needle):
    path = make_adapter(LLAMA, tmp_path / "a", r=4, target_modules=targets)
    refused(path, "adapter_unsupported", needle)


def test_mixed_key_naming(adapter):
    edit_weights(adapter, lambda t: {(k.removeprefix("base_model.model.") if k in (A0, B0) else k): v
                                     for k, v in t.items()})
    refused(adapter, "adapter_invalid", "naming")


def test_adapter_for_a_wider_base_model(tmp_path):
    wide = Base(transformers.LlamaConfig(**{**TINY, "hidden_size": 96}))
    path = make_adapter(wide, tmp_path / "wide", r=4, target_modules=["q_proj"])
    refused(path, "adapter_incompatible", "another base model", "96")


@pytest.mark.parametrize("layers,needle", [(4, "only 3 layers"), (2, "shallower")])
def test_adapter_for_a_deeper_or_shallower_model(tmp_path, layers, needle):
    other = Base(transformers.LlamaConfig(**{**TINY, "num_hidden_layers": layers}))
    path = make_adapter(other, tmp_path / "a", r=4, target_modules=["v_proj"])
    refused(path, "adapter_incompatible", needle)


def test_rank_above_max_rank(adapter):
    refused(adapter, "adapter_unsupported", "max_rank 4", max_rank=4)


def test_rank_disagrees_with_config(adapter):
    edit_config(adapter, r=16)
    refused(adapter, "adapter_invalid", "rank 8", "gives 16")


def test_rank_pattern_order_lost_by_peft_save(tmp_path):
    """PEFT takes the FIRST matching rank_pattern key but saves the config with
    sort_keys=True: here training gave layer 1 rank 8 ("q_proj" first), the saved
    file lists "layers.1..." first, so PEFT cannot reload its own adapter."""
    path = make_adapter(LLAMA, tmp_path / "a", r=4, target_modules=["q_proj"],
                        rank_pattern={"q_proj": 8, "layers.1.self_attn.q_proj": 16})
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(LLAMA.model(), str(path))
    refused(path, "adapter_invalid", "layers.1.self_attn.q_proj", "rank 8", "gives 16")


def test_config_targets_modules_without_weights(adapter):
    edit_config(adapter, target_modules=["q_proj", "v_proj", "down_proj", "k_proj"])
    refused(adapter, "adapter_invalid", "k_proj", "no weights")


def test_weights_for_modules_the_config_does_not_target(adapter):
    edit_config(adapter, target_modules=["q_proj", "down_proj"])
    refused(adapter, "adapter_invalid", "v_proj", "does not target")


# ---------------------------------------------------------------- refusals: config


@pytest.mark.parametrize("changes,code,needle", [
    ({"fan_in_fan_out": "yes"}, "adapter_invalid", "fan_in_fan_out must be true or false"),
    ({"bias": "all"}, "adapter_unsupported", 'bias="all"'),
    ({"bias": "lora_only"}, "adapter_unsupported", 'bias="lora_only"'),
    ({"modules_to_save": ["lm_head"]}, "adapter_unsupported", "modules_to_save"),
    ({"use_dora": True}, "adapter_invalid", "sets use_dora but"),  # no lora_magnitude_vector tensors
    ({"use_dora": "true"}, "adapter_invalid", "use_dora must be true or false"),
    ({"lora_bias": True}, "adapter_unsupported", "lora_bias"),
    ({"peft_type": "ADALORA"}, "adapter_unsupported", "ADALORA"),
    ({"peft_type": "IA3"}, "adapter_unsupported", "IA3"),
    ({"peft_type": None}, "adapter_invalid", "peft_type"),
    ({"init_lora_weights": "pissa_niter_4"}, "adapter_unsupported", "rewrites the base weights"),
    ({"r": 0}, "adapter_invalid", "r must be"),
    ({"lora_alpha": "16"}, "adapter_invalid", "lora_alpha"),
    ({"rank_pattern": {"q_proj": [True, False]}}, "adapter_invalid", "rank_pattern"),
    ({"target_modules": "q_proj|" * 200}, "adapter_invalid", "longer than 512"),
    ({"target_modules": "(.*)*x"}, "adapter_invalid", "catastrophic"),
    ({"target_modules": r"(\w|_\w)*x"}, "adapter_invalid", "catastrophic"),  # 2^n: 11 s at 48 chars
    ({"rank_pattern": {"([": 4}}, "adapter_invalid", "invalid regex"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "adapter_invalid", "layers_to_transform"),
    ({"layers_pattern": "layers"}, "adapter_invalid", "layers_pattern"),
])
def test_config_refusals(adapter, changes, code, needle):
    edit_config(adapter, **changes)
    err = refused(adapter, code, needle)
    assert "adapter_config.json" in str(err)


def test_real_peft_modules_to_save_adapter(tmp_path):
    path = make_adapter(LLAMA, tmp_path / "mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    refused(path, "adapter_unsupported", "modules_to_save")
