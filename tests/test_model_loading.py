"""server/model/loading.py and the checks at the top of arch.py: a checkpoint directory -> the
fused weights, or a clear refusal that names what is wrong (never weights read wrongly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny_model
from server.model.arch import ModelArch, UnsupportedModelError
from server.model.loading import load_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "m", "llama", num_hidden_layers=1)


def load(path: Path, dtype: torch.dtype = torch.float32):
    return load_weights(path, ModelArch.from_dir(path), dtype, CPU)


def rewrite(tiny: Path, to: Path, edit) -> Path:
    """A copy of `tiny` (its config and its tensors, edited in place by `edit`)."""
    to.mkdir()
    tensors = load_file(str(tiny / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(to / "model.safetensors"), metadata={"format": "pt"})
    (to / "config.json").write_text((tiny / "config.json").read_text())
    return to


def test_sharded_and_16_bit_checkpoints_load_the_same_weights(tiny, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    whole, sharded = load(tiny), load(tmp_path / "sharded")
    assert torch.equal(whole.layers[0].qkv.bfloat16().float(), sharded.layers[0].qkv)
    assert torch.equal(whole.lm_head.bfloat16().float(), sharded.lm_head)


def test_a_missing_tensor_is_named(tiny, tmp_path):
    path = rewrite(tiny, tmp_path / "c", lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(UnsupportedModelError, match="missing tensor 'model.layers.0.mlp.up_proj.weight'"):
        load(path)


def test_a_mis_shaped_tensor_is_named_with_both_shapes(tiny, tmp_path):
    def cut(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16].clone()

    with pytest.raises(UnsupportedModelError, match=r"k_proj.weight: shape \(16, 64\) does not match config "
                                                    r"\(32, 64\)"):
        load(rewrite(tiny, tmp_path / "c", cut))


def test_pickle_checkpoints_are_refused_by_name(tiny, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text((tiny / "config.json").read_text())
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsupportedModelError, match="pytorch_model.bin: pickle checkpoints are never loaded"):
        load(tmp_path / "p")


def test_a_quantized_checkpoint_is_refused_by_its_method(tiny, tmp_path):
    """FP8 checkpoints keep q_proj.weight at its full shape, in float8, beside a `weight_scale`: cast
    to the model dtype without the scales they loaded as wrong weights, silently."""
    def to_fp8(t):
        for name in [n for n in t if n.endswith("proj.weight")]:
            t[name] = t[name].to(torch.float8_e4m3fn)
            t[name[: -len("weight")] + "weight_scale"] = torch.tensor(0.01)

    path = rewrite(tiny, tmp_path / "fp8", to_fp8)
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.self_attn.q_proj.weight: dtype "
                                                    r"torch.float8_e4m3fn is not a 16-, 32- or 64-bit float"):
        load(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quantized checkpoints are not supported \\(quant_method 'fp8'\\)"):
        ModelArch.from_dir(path)
