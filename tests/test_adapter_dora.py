"""DoRA adapters (PEFT use_dora): parsed, validated, and their rescale g = m / ||W + s*B@A||_row
computed at load against the base weights, with PEFT's DoraLinearLayer as the reference.

Adapters are made by PEFT (`get_peft_model(..., LoraConfig(use_dora=True))`) on the tiny random
models of conftest.py, with lora_B and the magnitudes randomized (PEFT's init makes B = 0 and
m = ||W||, so g = 1 and the rescale would be invisible), then saved and reloaded by PEFT.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from server.adapters import AdapterError, parse_peft_adapter
from server.adapters.dora import with_dora_scales
from server.adapters.manager import AdapterManager
from server.config import Config
from server.metrics import Metrics
from server.model.arch import ModelArch
from server.model.loading import base_linear_weight, load_weights

from adapter_files import lora_layers
from conftest import save_tiny_model

WEIGHTS = "adapter_model.safetensors"
MAG0 = "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_phi3_dir(tmp_path_factory) -> Path:
    """Phi-3: fused qkv_proj / gate_up_proj in the checkpoint, so a PEFT module is a whole group."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-phi3"), "phi3", seed=2, pad_token_id=0)


def make_dora_adapter(base_dir: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(use_dora=True, lora_dropout=0.0, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
    peft_model.save_pretrained(str(out))
    return out


def peft_layers(base_dir: Path, adapter_dir: Path) -> dict[tuple[int, str], LoraLayer]:
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return lora_layers(PeftModel.from_pretrained(model, str(adapter_dir)).eval())


def peft_dora_scale(layer: LoraLayer) -> torch.Tensor:
    """PEFT's own m / weight norm for one DoRA layer (DoraLinearLayer.get_weight_norm)."""
    dora = layer.lora_magnitude_vector["default"]
    lora_weight = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    norm = dora.get_weight_norm(layer.get_base_layer().weight, lora_weight, layer.scaling["default"])
    return (dora.weight / norm).detach()


def base_weights_of(base_dir: Path):
    arch = ModelArch.from_dir(base_dir)
    return arch, functools.partial(base_linear_weight, load_weights(base_dir, arch, torch.float32,
                                                                    torch.device("cpu")), arch)


CASES = {
    "llama-all-linear": ("tiny_llama_dir", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                                rank_pattern={"down_proj": 8})),
    "qwen2-attn-rslora": ("tiny_qwen2_dir", dict(r=8, lora_alpha=16, use_rslora=True,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "phi3-fused": ("tiny_phi3_dir", dict(r=4, lora_alpha=4, target_modules=["qkv_proj", "gate_up_proj",
                                                                           "down_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dora_scale_equals_peft(case, request, tmp_path):
    fixture, kwargs = CASES[case]
    base_dir = request.getfixturevalue(fixture)
    path = make_dora_adapter(base_dir, tmp_path / case, **kwargs)
    arch, base_weight = base_weights_of(base_dir)
    summary, parsed = parse_peft_adapter(path, arch, name="d", max_rank=16)
    assert summary.use_dora and parsed.use_dora and not parsed.dora_ready
    ours = with_dora_scales(parsed, base_weight)
    assert ours.dora_ready and ours.nbytes == parsed.nbytes + sum(w.dora_scale.numel() * 4
                                                                  for w in ours.modules.values())
    ref = peft_layers(base_dir, path)
    assert set(ours.modules) == set(ref)
    gen = torch.Generator().manual_seed(1)
    for key, layer in ref.items():
        w = ours.modules[key]
        want = peft_dora_scale(layer)
        assert (want - 1).abs().max() > 1e-2  # a visible rescale, not PEFT's init
        assert w.dora_scale.dtype == torch.float32 and w.dora_scale.shape == want.shape
        torch.testing.assert_close(w.dora_scale, want, rtol=1e-5, atol=1e-6, msg=f"{key}")
        # The runtime's formula (design: y = g*y + (1-g)*bias after base + LoRA) equals PEFT's DoRA layer.
        x = torch.randn(5, layer.in_features, generator=gen)
        base = layer.get_base_layer()
        with torch.no_grad():
            want_y = layer(x)
            y = base(x) + w.scale * (x @ w.a.T) @ w.b.T
            bias = base.bias if base.bias is not None else torch.zeros(())
            got_y = w.dora_scale * y + (1 - w.dora_scale) * bias
        torch.testing.assert_close(got_y, want_y, rtol=1e-4, atol=1e-5, msg=f"{key}")


def test_base_linear_weight_views_the_fused_rows(tiny_qwen2_dir):
    arch = ModelArch.from_dir(tiny_qwen2_dir)
    weights = load_weights(tiny_qwen2_dir, arch, torch.float32, torch.device("cpu"))
    hf = load_file(str(next(tiny_qwen2_dir.glob("*.safetensors"))))
    for layer in range(arch.num_layers):
        for module in arch.lora_targets:
            w = base_linear_weight(weights, arch, layer, module)
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            assert torch.equal(w, hf[f"model.layers.{layer}.{block}.{module}.weight"])
            group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
                     "up_proj": "gate_up", "down_proj": "down"}[module]
            fused = getattr(weights.layers[layer], group)
            assert w.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # a view, no copy
    with pytest.raises(KeyError):
        base_linear_weight(weights, arch, 0, "lm_head")


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def dora_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_dora_adapter(tiny_llama_dir, tmp_path_factory.mktemp("dora") / "d", r=4,
                             target_modules=["q_proj", "v_proj"])


@pytest.fixture
def broken(dora_adapter, tmp_path) -> Path:
    return Path(shutil.copytree(dora_adapter, tmp_path / "broken"))


def edit_weights(path: Path, fn) -> None:
    save_file(fn(dict(load_file(str(path / WEIGHTS)))), str(path / WEIGHTS), metadata={"format": "pt"})


def refused(path: Path, arch: ModelArch, code: str, *needles: str) -> None:
    with pytest.raises(AdapterError) as info:
        parse_peft_adapter(path, arch, name="d", max_rank=16)
    print(f"[{info.value.code}] {info.value}")
    assert info.value.code == code, str(info.value)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_magnitude(broken, tiny_llama_dir, bad):
    edit_weights(broken, lambda t: {**t, MAG0: torch.where(torch.arange(32) == 3, bad, t[MAG0])})
    refused(broken, ModelArch.from_dir(tiny_llama_dir), "adapter_invalid", MAG0, "NaN/Inf")


def test_a_magnitude_past_the_served_range_is_refused(broken, tiny_llama_dir):
    edit_weights(broken, lambda t: {**t, MAG0: t[MAG0] * 1e30})  # finite in float32: passes the NaN/Inf check
    refused(broken, ModelArch.from_dir(tiny_llama_dir), "adapter_invalid", MAG0, "DoRA magnitudes must be at most")


@pytest.mark.parametrize("shape", [(64,), (32, 1), (1,)])
def test_magnitude_of_the_wrong_shape(broken, tiny_llama_dir, shape):
    edit_weights(broken, lambda t: {**t, MAG0: torch.ones(shape)})
    refused(broken, ModelArch.from_dir(tiny_llama_dir), "adapter_invalid", "layer 0 v_proj",
            "lora_magnitude_vector has shape", "[32]")


def test_dora_module_without_magnitude(broken, tiny_llama_dir):
    edit_weights(broken, lambda t: {k: v for k, v in t.items() if k != MAG0})
    refused(broken, ModelArch.from_dir(tiny_llama_dir), "adapter_invalid", "sets use_dora",
            "layers.0.self_attn.v_proj has no lora_magnitude_vector")


def test_magnitude_without_use_dora(broken, tiny_llama_dir):
    cfg = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    refused(broken, ModelArch.from_dir(tiny_llama_dir), "adapter_invalid", "DoRA magnitude vector",
            "does not set use_dora")


def test_magnitude_without_lora_weights(broken, tiny_llama_dir):
    lora_a = MAG0.replace("lora_magnitude_vector", "lora_A.weight")
    edit_weights(broken, lambda t: {k: v for k, v in t.items() if k != lora_a})
    refused(broken, ModelArch.from_dir(tiny_llama_dir), "adapter_invalid", "no matching lora_A")


@pytest.mark.parametrize("rename,ok", [
    (lambda k: k.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
     .replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."), True),  # state_dict() naming
    (lambda k: k.removeprefix("base_model.model."), True),
    (lambda k: k.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight"), False),  # mixed
    (lambda k: k.replace("lora_magnitude_vector", "lora_magnitude_vector.weight"), False),
])
def test_magnitude_key_naming(broken, dora_adapter, tiny_llama_dir, rename, ok):
    arch = ModelArch.from_dir(tiny_llama_dir)
    edit_weights(broken, lambda t: {rename(k): v for k, v in t.items()})
    if not ok:
        with pytest.raises(AdapterError):
            parse_peft_adapter(broken, arch, name="d", max_rank=16)
        return
    got = parse_peft_adapter(broken, arch, name="d", max_rank=16)[1]
    want = parse_peft_adapter(dora_adapter, arch, name="d", max_rank=16)[1]
    for key, w in want.modules.items():
        assert torch.equal(got.modules[key].magnitude, w.magnitude)


def test_dora_without_base_weights_is_refused(dora_adapter, tiny_llama_dir):
    parsed = parse_peft_adapter(dora_adapter, ModelArch.from_dir(tiny_llama_dir), name="d", max_rank=16)[1]
    with pytest.raises(AdapterError) as info:
        with_dora_scales(parsed, None)
    assert info.value.code == "adapter_unsupported" and "base model's weights" in str(info.value)


def test_zero_norm_row_is_refused(dora_adapter, tiny_llama_dir):
    arch, base_weight = base_weights_of(tiny_llama_dir)
    parsed = parse_peft_adapter(dora_adapter, arch, name="d", max_rank=16)[1]
    w = parsed.modules[(1, "q_proj")]

    def cancelling(layer: int, module: str) -> torch.Tensor:
        base = base_weight(layer, module).clone()
        if (layer, module) == (1, "q_proj"):
            base[5] = -w.scale * (w.b @ w.a)[5]  # row 5 of W + s*B@A is exactly 0
        return base
    with pytest.raises(AdapterError) as info:
        with_dora_scales(parsed, cancelling)
    assert info.value.code == "adapter_incompatible" and "layer 1 q_proj" in str(info.value)


# ---------------------------------------------------------------- every load path computes g


def manager_for(arch: ModelArch, base_weight, **lora) -> AdapterManager:
    cfg = Config().lora
    cfg.adapters_dir = None
    cfg.max_cpu_loras = 4
    for k, v in lora.items():
        setattr(cfg, k, v)
    return AdapterManager(cfg, arch, torch.float32, torch.device("cpu"), Metrics(), base_weight=base_weight)


def wait_loaded(manager: AdapterManager, ref, timeout: float = 30.0) -> dict:
    manager.prefetch([ref], set())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failed = manager.poll(lambda: ())
        if failed or manager.is_ready(ref):
            return failed
        time.sleep(0.01)
    raise AssertionError("load did not finish")


def test_every_load_path_computes_the_rescale(dora_adapter, tiny_llama_dir):
    arch, base_weight = base_weights_of(tiny_llama_dir)
    ref_scales = {k: peft_dora_scale(layer) for k, layer in peft_layers(tiny_llama_dir, dora_adapter).items()}
    manager = manager_for(arch, base_weight, lora_modules={"lazy": str(dora_adapter)},
                          allowed_adapter_roots=[str(dora_adapter.parent)])
    lazy = manager.lookup(None, "lazy")
    assert manager.get(None, "lazy").summary.use_dora is True  # --lora-modules are inspected at start
    assert wait_loaded(manager, lazy) == {}  # host cache load (loader thread)
    admin = manager.load_path(None, "admin", str(dora_adapter)).ref  # admin load
    manager.poll(lambda: ())
    step = manager.activate([lazy, admin])
    slots = step.slots
    for ref in (lazy, admin):
        slot = step.slot_of[ref]
        assert slots.slot_dora[slot]
        for (layer, module), want in ref_scales.items():
            group, i = slots._slice_of[module]
            lo, hi = slots.offsets[group][i], slots.offsets[group][i + 1]
            torch.testing.assert_close(slots.layer_dora[group][layer][slot, lo:hi], want, rtol=1e-5, atol=1e-6)
        untouched = slots.layer_dora["gate_up"][0][slot]  # not adapted: no rescale
        assert torch.equal(untouched, torch.ones_like(untouched))


def test_store_adapter_says_dora_once_read(dora_adapter, tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(dora_adapter, store / "s")
    arch, base_weight = base_weights_of(tiny_llama_dir)
    manager = manager_for(arch, base_weight, adapters_dir=str(store))
    ref = manager.lookup(None, "s")
    assert manager.get(None, "s").summary.use_dora is None  # listed at startup, nothing read
    assert wait_loaded(manager, ref) == {}
    assert manager.get(None, "s").summary.use_dora is True


def test_dora_load_fails_without_base_weights(dora_adapter, tiny_llama_dir):
    arch = ModelArch.from_dir(tiny_llama_dir)
    manager = manager_for(arch, None, lora_modules={"d": str(dora_adapter)},
                          allowed_adapter_roots=[str(dora_adapter.parent)])
    ref = manager.lookup(None, "d")
    failed = wait_loaded(manager, ref)
    assert failed[ref].code == "adapter_unsupported" and not manager.is_ready(ref)
    assert manager.get(None, "d").summary.use_dora is True  # listings can say why
    with pytest.raises(AdapterError, match="base model's weights"):
        manager.load_path(None, "admin", str(dora_adapter))
    assert manager.get(None, "admin") is None  # nothing registered
