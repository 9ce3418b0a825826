"""Shared fixtures: tiny random Llama-family models (built with transformers configs) and
the real default model. Every model directory is what a user would point `--model` at."""

from __future__ import annotations

import json
import shutil
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def byte_level_tokenizer(vocab_size: int):
    """A self-contained byte-level BPE tokenizer: 256 byte tokens + <s>, </s>, then merges
    of common pairs until `vocab_size` — enough for detokenization tests without downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog. " * 4, "Hello world, hello tokens! 0123456789",
              "Paris is the capital of France. Ça va? 日本語のテキスト"]
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def save_tiny_model(path: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Random-weight model saved as safetensors + tokenizer.json; returns `path`."""
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, bos_token_id=0,
                  eos_token_id=1, tie_word_embeddings=False)
    common.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **common)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Wider weights than the default init make logits peaked, so greedy ties are rare.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    tok = byte_level_tokenizer(common["vocab_size"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}",
    }))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: thread fan-out only costs time on the shared 2-core machine. Use it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from server.model.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    """A PEFT-made rank-8 adapter (q, v, down) on adapter_files.LLAMA, shared by a module's tests."""
    from adapter_files import LLAMA, make_adapter

    return make_adapter(LLAMA, tmp_path_factory.mktemp("good") / "good", r=8, lora_alpha=16,
                        target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture
def adapter(good_adapter, tmp_path) -> Path:
    """A private copy of `good_adapter`, to break."""
    return Path(shutil.copytree(good_adapter, tmp_path / "adapter"))


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect: every interpreter test of the modules
def pytest_collection_modifyitems(items):
    from child_runs import note_interp_tests

    note_interp_tests(items)


def pytest_collection_finish(session):
    """Modules that rerun their Triton tests in a child share one (tests/child_runs.py)."""
    from child_runs import register

    register(session.items)
