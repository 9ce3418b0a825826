"""PEFT LoRA adapter parsing and validation, with PEFT itself as the reference.

Adapters are made by PEFT (`get_peft_model` + `save_pretrained`) on tiny random
Llama / Qwen2 / Mistral models, reloaded by PEFT (`PeftModel.from_pretrained`) and by
us; for every adapted module and a random x, our `scale * (x @ a.T) @ b.T` must equal
PEFT's `lora_layer(x) - base_layer(x)`. What is refused: tests/test_adapter_refusals.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.adapters import (AdapterError, load_peft_adapter, parse_peft_adapter, read_adapter_config,
                             scan_adapter_store)
from server.adapters import validate_adapter_name

from adapter_files import (CONFIG, LLAMA, MISTRAL, QWEN2, WEIGHTS, Base, edit_config, edit_weights, load,
                           make_adapter, peft_lora_layers)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_fan_in_fan_out_on_linear_layers_is_served_as_peft_serves_it(tmp_path):
    """PEFT turns fan_in_fan_out off for nn.Linear targets (every family served here) with a warning,
    and its unmerged forward is lora_B(lora_A(x)) either way: a config saying true is served like
    PEFT serves it (before: refused as adapter_unsupported)."""
    path = make_adapter(LLAMA, tmp_path / "fifo", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    edit_config(path, fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft_lora_layers(LLAMA, path)  # the oracle loads it too
    assert_matches_peft(LLAMA, path)


@pytest.mark.parametrize("targets,want", [(None, ["q_proj", "v_proj"]), ("all-linear", None),
                                          ("ALL-LINEAR", None)])
def test_config_target_shorthands(tmp_path, targets, want):
    """Hand-written configs: null means PEFT's per-model default, "all-linear" every projection."""
    path = make_adapter(LLAMA, tmp_path / "a", r=4, target_modules=want or "all-linear")
    edit_config(path, target_modules=targets)
    assert_matches_peft(LLAMA, path)


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
