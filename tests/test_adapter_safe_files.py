"""The read policy of server/adapters/safe_files.py on every registration path, and reads that
stay on the checked file when links or files are swapped after the check."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from server.adapters import AdapterError
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.adapters.safe_files import AdapterDir, OpenAdapterDir, read_limited
from server.adapters.safetensors_file import load_tensors_fp32, read_header
from server.model.arch import ModelArch

ARCH = ModelArch.from_hf_config(transformers.LlamaConfig(
    hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128).to_dict())
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def write_adapter(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    (path / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                           "target_modules": ["q_proj"], "base_model_name_or_path": f"s{seed}"}))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(ARCH.num_layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 64, generator=gen)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(64, 4, generator=gen)
    save_file(tensors, str(path / WEIGHTS))
    return path


def linked_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (CONFIG, WEIGHTS):
        (dst / name).symlink_to(src / name)
    return dst


def test_lora_modules_paths_refuse_symlinked_files(tmp_path):
    """--lora-modules names a directory; its files must still be regular files inside it."""
    linked = linked_copy(write_adapter(tmp_path / "real"), tmp_path / "linked")
    registry = AdapterRegistry(ARCH, 8, [])
    with pytest.raises(AdapterError, match="symbolic link") as info:
        registry.add(None, "x", linked, "cli")
    assert str(info.value).startswith(f"{CONFIG}: ") and str(tmp_path) not in str(info.value)
    assert str(tmp_path) in info.value.detail  # the full path is for the server log
    assert registry.add(None, "y", tmp_path / "real", "cli").summary.where.label == "real"


def test_base_model_name_is_reserved_on_every_path(tmp_path, caplog):
    store = tmp_path / "store"
    write_adapter(store / "base")
    write_adapter(store / "other")
    registry = AdapterRegistry(ARCH, 8, [store], reserved_names=["base"])
    with caplog.at_level(logging.WARNING):
        refused = registry.scan_store(AdapterStore(store))
    assert [e.code for e in refused] == ["adapter_exists"] and "not serving adapter 'base'" in caplog.text
    assert [e.name for e in registry.entries()] == ["other"]
    for source, path in (("cli", store / "base"), ("admin", str(store / "base"))):
        with pytest.raises(AdapterError, match="base model's name") as info:
            registry.add(None, "base", path, source, replace=True)
        assert info.value.code == "adapter_exists"


def test_forbidden_names_neither_the_roots_nor_the_target(tmp_path):
    root = tmp_path / "root"
    write_adapter(tmp_path / "secret-project")
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "secret-project", target_is_directory=True)
    registry = AdapterRegistry(ARCH, 8, [root])
    for path in (root / "link", tmp_path / "secret-project", "/etc"):
        with pytest.raises(AdapterError) as info:
            registry.check_allowed(str(path))
        assert info.value.code == "adapter_forbidden"
        assert "secret-project" not in str(info.value) and str(root) not in str(info.value)


def test_a_directory_swapped_for_a_link_after_opening_is_not_followed(tmp_path):
    root = tmp_path / "root"
    write_adapter(root / "a", seed=1)
    write_adapter(tmp_path / "outside", seed=2)
    with OpenAdapterDir(AdapterDir(root.resolve(), ("a",))) as files:
        (root / "a").rename(root / "old")
        (root / "a").symlink_to(tmp_path / "outside", target_is_directory=True)
        fd = files.open_file(CONFIG)
        assert json.loads(read_limited(fd, 10_000))["base_model_name_or_path"] == "s1"
    with pytest.raises(AdapterError, match="not an adapter directory"):  # a fresh open refuses the link
        OpenAdapterDir(AdapterDir(root.resolve(), ("a",)))


def test_tensors_come_from_the_file_whose_header_was_checked(tmp_path):
    adapter = write_adapter(tmp_path / "a", seed=1)
    write_adapter(tmp_path / "b", seed=2)
    with OpenAdapterDir(AdapterDir.own_root(adapter)) as files:
        fd = files.open_file(WEIGHTS)
        names = sorted(read_header(fd, max_bytes=1 << 20, path=adapter / WEIGHTS))
        os.replace(tmp_path / "b" / WEIGHTS, adapter / WEIGHTS)  # swapped after the check
        got = load_tensors_fp32(fd, names, adapter / WEIGHTS)
    want = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got[names[0]], want)


def test_fifo_and_device_files_are_refused_without_blocking(tmp_path):
    adapter = write_adapter(tmp_path / "a")
    (adapter / CONFIG).unlink()
    os.mkfifo(adapter / CONFIG)
    with OpenAdapterDir(AdapterDir.own_root(adapter)) as files:
        with pytest.raises(AdapterError, match="not a regular file"):
            files.open_file(CONFIG)
    if Path("/dev/zero").exists():
        shutil.rmtree(adapter)
        adapter.mkdir()
        (adapter / CONFIG).symlink_to("/dev/zero")  # a link: refused before the device is opened
        with OpenAdapterDir(AdapterDir.own_root(adapter)) as files, pytest.raises(AdapterError, match="symbolic"):
            files.open_file(CONFIG)
