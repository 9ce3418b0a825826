"""PEFT LoRA adapter parsing and validation, with PEFT itself as the reference.

Adapters are made by PEFT (`get_peft_model` + `save_pretrained`) on tiny random
Llama / Qwen2 / Mistral models, reloaded by PEFT (`PeftModel.from_pretrained`) and by
us; for every adapted module and a random x, our `scale * (x @ a.T) @ b.T` must equal
PEFT's `lora_layer(x) - base_layer(x)`. Refusals are crafted from real adapters.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from server.adapters import AdapterError, load_peft_adapter, parse_peft_adapter, read_adapter_config, scan_adapter_store
from server.adapters import validate_adapter_name
from server.model.arch import ModelArch

TINY = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Base:
    """A tiny random base model family member and its ModelArch."""

    config: transformers.PretrainedConfig

    @property
    def arch(self) -> ModelArch:
        return ModelArch.from_hf_config(self.config.to_dict())

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(self.config).eval()


LLAMA = Base(transformers.LlamaConfig(**TINY))
QWEN2 = Base(transformers.Qwen2Config(**TINY))  # q/k/v carry biases
MISTRAL = Base(transformers.MistralConfig(**TINY, head_dim=32))  # q_size 128 != hidden 64


def make_adapter(base: Base, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A PEFT-made adapter with random A and (unlike PEFT's zero init) random B, saved to `out`."""
    peft_model = get_peft_model(base.model(), LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(str(out))
    return out


def peft_lora_layers(base: Base, adapter_dir: Path) -> dict[tuple[int, str], LoraLayer]:
    """(layer, projection) -> PEFT's LoRA layer, as PEFT itself loads `adapter_dir`."""
    model = PeftModel.from_pretrained(base.model(), str(adapter_dir)).eval()
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            parts = name.split(".")
            layers[(int(parts[parts.index("layers") + 1]), parts[-1])] = module
    return layers


def assert_matches_peft(base: Base, adapter_dir: Path, max_rank: int = 64):
    ours = load_peft_adapter(adapter_dir, base.arch, name="t", max_rank=max_rank)
    ref = peft_lora_layers(base, adapter_dir)
    assert set(ours.modules) == set(ref), "targeted modules differ from PEFT's"
    gen = torch.Generator().manual_seed(1)
    for key, layer in ref.items():
        w = ours.modules[key]
        assert w.rank == layer.r["default"]
        assert w.a.dtype == torch.float32 and w.a.is_contiguous() and w.b.is_contiguous()
        x = torch.randn(5, layer.in_features, generator=gen)
        with torch.no_grad():
            want = layer(x) - layer.get_base_layer()(x)
        got = w.scale * (x @ w.a.T) @ w.b.T
        assert want.abs().max() > 1e-3  # a real delta, not PEFT's zero init
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{key}")
    assert ours.rank == max(w.rank for w in ours.modules.values())
    assert ours.num_params == sum(w.a.numel() + w.b.numel() for w in ours.modules.values())
    assert ours.nbytes == 4 * (ours.num_params + sum(w.prototype.numel() for w in ours.modules.values()))
    assert not ours.use_dora and all(w.magnitude is None and w.dora_scale is None for w in ours.modules.values())
    assert ours.target_modules == tuple(m for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj") if any(k[1] == m for k in ref))
    return ours


PARITY_CASES = {
    "llama-qv-r4": (LLAMA, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-r16-rslora": (LLAMA, dict(r=16, lora_alpha=32, target_modules="all-linear",
                                                use_rslora=True)),
    "llama-rank-alpha-patterns": (LLAMA, dict(
        r=8, lora_alpha=16, target_modules="all-linear",
        rank_pattern={"down_proj": 64, "model.layers.1.self_attn.k_proj": 4},
        alpha_pattern={"o_proj": 3, "layers.2.mlp.up_proj": 40})),
    # First match in file order wins; this order survives PEFT's sort_keys=True save.
    "llama-rank-pattern-order": (LLAMA, dict(r=8, target_modules=["q_proj"],
                                             rank_pattern={"layers.1.self_attn.q_proj": 16, "q_proj": 12})),
    # Keys must match a whole dotted suffix ("proj", "attn.v_proj" match nothing) and are
    # regexes ("self.attn.q.proj" matches "self_attn.q_proj": "." is any character).
    "llama-pattern-key-matching": (LLAMA, dict(
        r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"proj": 16, "attn.v_proj": 12, "mlp.down_proj": 6},
        alpha_pattern={"self.attn.q.proj": 2, "v_proj": 3})),
    "llama-regex-targets": (LLAMA, dict(r=6, lora_alpha=7, target_modules=
                                        r".*\.layers\.[02]\.(self_attn\.(q|o)_proj|mlp\.gate_proj)")),
    "llama-layers-to-transform": (LLAMA, dict(r=8, target_modules=["k_proj", "up_proj"],
                                              layers_to_transform=[0, 2], layers_pattern="layers")),
    # An entry equal to the full module name is not subject to layers_to_transform.
    "llama-exact-name-bypasses-layers": (LLAMA, dict(r=4, layers_to_transform=[0], target_modules=[
        "model.layers.1.self_attn.q_proj", "v_proj"])),
    "llama-exclude": (LLAMA, dict(r=4, target_modules=["q_proj", "o_proj", "down_proj"],
                                  exclude_modules=["model.layers.1.self_attn.o_proj"])),
    "qwen2-attn-r32-rslora": (QWEN2, dict(r=32, lora_alpha=16, use_rslora=True,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                          alpha_pattern={"v_proj": 64})),
    "qwen2-mlp-one-layer": (QWEN2, dict(r=4, lora_alpha=4, target_modules=["gate_proj", "down_proj"],
                                        layers_to_transform=1)),
    "mistral-head-dim": (MISTRAL, dict(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj", "v_proj"])),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parsed_deltas_equal_peft(case, tmp_path):
    base, kwargs = PARITY_CASES[case]
    ours = assert_matches_peft(base, make_adapter(base, tmp_path / case, **kwargs))
    if case == "llama-rank-alpha-patterns":
        assert ours.modules[(0, "down_proj")].rank == 64 and ours.modules[(1, "k_proj")].rank == 4
        assert ours.modules[(0, "o_proj")].scale == pytest.approx(3 / 8)
        assert ours.modules[(2, "up_proj")].scale == pytest.approx(40 / 8)
    if case == "llama-pattern-key-matching":
        assert {k[1]: w.rank for k, w in ours.modules.items()} == {"q_proj": 8, "v_proj": 8, "down_proj": 6}
        assert ours.modules[(0, "q_proj")].scale == pytest.approx(2 / 8)
    if case == "llama-rank-pattern-order":  # the first matching key wins, not the catch-all
        assert [ours.modules[(i, "q_proj")].rank for i in range(3)] == [12, 16, 12]
    if case == "llama-exact-name-bypasses-layers":
        assert sorted(ours.modules) == [(0, "v_proj"), (1, "q_proj")]
    if case == "llama-layers-to-transform":
        assert sorted(ours.modules) == [(0, "k_proj"), (0, "up_proj"), (2, "k_proj"), (2, "up_proj")]


@pytest.mark.parametrize("targets,want", [(None, ["q_proj", "v_proj"]), ("all-linear", None),
                                          ("ALL-LINEAR", None)])
def test_config_target_shorthands(tmp_path, targets, want):
    """Hand-written configs: null means PEFT's per-model default, "all-linear" every projection."""
    path = make_adapter(LLAMA, tmp_path / "a", r=4, target_modules=want or "all-linear")
    edit_config(path, target_modules=targets)
    assert_matches_peft(LLAMA, path)


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    return make_adapter(LLAMA, tmp_path_factory.mktemp("good") / "good", r=8, lora_alpha=16,
                        target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture
def adapter(good_adapter, tmp_path) -> Path:
    """A private copy of a good Llama adapter, to break."""
    return Path(shutil.copytree(good_adapter, tmp_path / "adapter"))


def load(path: Path, base: Base = LLAMA, **kwargs):
    kwargs.setdefault("max_rank", 64)
    return load_peft_adapter(path, base.arch, name="t", **kwargs)


def refused(path: Path, code: str, *needles: str, base: Base = LLAMA, **kwargs) -> AdapterError:
    with pytest.raises(AdapterError) as info:
        load(path, base, **kwargs)
    err = info.value
    print(f"[{err.code}] {err}")  # shown by pytest on failure, and with -s for reviewing messages
    assert err.code == code, str(err)
    for needle in needles:
        assert needle in str(err), f"{needle!r} not in {err}"
    return err


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / CONFIG).read_text())
    cfg.update(changes)
    (path / CONFIG).write_text(json.dumps(cfg))


def edit_weights(path: Path, fn) -> None:
    tensors = load_file(str(path / WEIGHTS))
    save_file(fn(dict(tensors)), str(path / WEIGHTS), metadata={"format": "pt"})


def test_key_variants_parse_the_same(adapter, tmp_path):
    want = load(adapter)
    for variant, rename in {
        "no-prefix": lambda k: k.removeprefix("base_model.model."),
        "infix": lambda k: k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."),
    }.items():
        other = Path(shutil.copytree(adapter, tmp_path / variant))
        edit_weights(other, lambda t: {rename(k): v for k, v in t.items()})
        got = load(other)
        assert set(got.modules) == set(want.modules)
        for key, w in want.modules.items():
            assert torch.equal(got.modules[key].a, w.a) and torch.equal(got.modules[key].b, w.b)


def test_half_precision_weights_become_fp32(adapter):
    edit_weights(adapter, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    stored = load_file(str(adapter / WEIGHTS))
    got = load(adapter)
    w = got.modules[(2, "down_proj")]
    assert w.a.dtype == torch.float32
    assert torch.equal(w.a, stored["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"].float())


def test_read_adapter_config_reads_only_the_config(adapter):
    (adapter / WEIGHTS).write_bytes(b"garbage")  # never looked at
    assert read_adapter_config(adapter) == json.loads((adapter / CONFIG).read_text())


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
    ({"fan_in_fan_out": True}, "adapter_unsupported", "fan_in_fan_out"),
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


def test_real_peft_dora_adapter_is_accepted(tmp_path):
    """DoRA was refused before issue 12; PEFT's own DoRA adapter now parses, magnitudes included
    (their rescale against the base weights: tests/test_adapter_dora.py)."""
    path = make_adapter(LLAMA, tmp_path / "dora", r=4, target_modules=["q_proj", "down_proj"], use_dora=True)
    summary, ours = parse_peft_adapter(path, LLAMA.arch, name="t", max_rank=64)
    assert summary.use_dora and ours.use_dora and not ours.dora_ready  # dora_scale needs the base weights
    ref = peft_lora_layers(LLAMA, path)
    assert set(ours.modules) == set(ref)
    for key, layer in ref.items():
        assert torch.equal(ours.modules[key].magnitude, layer.lora_magnitude_vector["default"].weight.detach())
    assert ours.num_params == sum(w.a.numel() + w.b.numel() + w.magnitude.numel() for w in ours.modules.values())


def test_real_peft_modules_to_save_adapter(tmp_path):
    path = make_adapter(LLAMA, tmp_path / "mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    refused(path, "adapter_unsupported", "modules_to_save")


# ---------------------------------------------------------------- names and the store


@pytest.mark.parametrize("name", ["a", "A-1_b.c", "x" * 64, "llama3.1-sql"])
def test_valid_names(name):
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "..", "a/b", "a\\b", "/etc", ".hidden", "-x", "x" * 65,
                                  "abc\n", "a b", "a\0b", "caf\u00e9", None, 3])
def test_invalid_names(name, adapter):
    with pytest.raises(AdapterError) as info:
        validate_adapter_name(name)
    assert info.value.code == "adapter_invalid" and "adapter id" in str(info.value)
    if isinstance(name, str):
        with pytest.raises(AdapterError):
            load_peft_adapter(adapter, LLAMA.arch, name=name, max_rank=64)


def test_scan_adapter_store(good_adapter, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(good_adapter, outside)
    for name in ("good", "also.good", "bad name", ".hidden", "-dash"):
        shutil.copytree(good_adapter, root / name)
    (root / "empty-dir").mkdir()
    (root / "notes.txt").write_text("not an adapter")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(root / "good", target_is_directory=True)
    (root / "self").symlink_to(root, target_is_directory=True)
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    linked = root / "linked-config"
    linked.mkdir()
    (linked / CONFIG).symlink_to(outside / CONFIG)
    (linked / WEIGHTS).symlink_to(outside / WEIGHTS)

    blobs = root / "_blobs"  # links to files, even inside the store: adapter files must be regular files
    shutil.copytree(good_adapter, blobs)
    deduped = root / "deduped"
    deduped.mkdir()
    (deduped / CONFIG).symlink_to(blobs / CONFIG)
    (deduped / WEIGHTS).symlink_to(blobs / WEIGHTS)

    found = scan_adapter_store(root)  # directory links are resolved, never followed out of the store

    assert found == {"alias": (root / "good").resolve(), "also.good": (root / "also.good").resolve(),
                     "good": (root / "good").resolve()}
    for name, path in found.items():
        assert parse_peft_adapter(path, LLAMA.arch, name=name, max_rank=64)[0].name == name
    assert scan_adapter_store(tmp_path / "missing") == {}
