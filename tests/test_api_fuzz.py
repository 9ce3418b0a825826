"""Property-based fuzz of the HTTP API from the server's own /openapi.json (schemathesis,
run as its CLI), against a real server on the tiny model.

Every generated request, valid or not, must get a documented status (never a 5xx), a
documented content type and a body matching the documented schema (SSE events included);
invalid requests must be refused (4xx) and valid ones accepted (2xx, or a documented 400
for what only the server can know: the context length, the vocabulary). Bounded and
deterministic: a fixed seed, derandomized generation, a few examples per operation.
The admin API is fuzzed too, with its only adapter root and store in a temporary
directory, so no generated `lora_path` can register anything outside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_adapters import make_peft_adapter
from server_process import ServerProcess

MODEL = "tiny"
TESTS = Path(__file__).resolve().parent

CONFIG = """
hooks = "fuzz_hooks"
seed = 9
[generation]
max-examples = 200
deterministic = true
database = "none"
[checks]
# Valid requests the server can refuse only at runtime (prompt + max_tokens over the
# context, token ids beyond the vocabulary, echo with logprobs) get the documented 400.
positive_data_acceptance.expected-statuses = ["2xx", "400", "404"]

# Well-formed admin requests can still name a taken, missing, in-use or forbidden adapter.
[[operations]]
include-path-regex = "^/v1/(load_lora_adapter|unload_lora_adapter|adapters/)"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "403", "404", "409"]
generation.max-examples = 50
"""


@pytest.fixture(scope="module")
def adapter_root(tiny_llama_dir, tmp_path_factory) -> Path:
    """The only allowed adapter root (the hook joins generated lora_paths to it), holding one
    valid adapter under "0", the string the generator tries most, so that some loads succeed."""
    root = tmp_path_factory.mktemp("adapter-root")
    make_peft_adapter(tiny_llama_dir, root / "0", seed=3, r=2, lora_alpha=2, target_modules=["q_proj"])
    return root


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapter_root, tmp_path_factory):
    store = tmp_path_factory.mktemp("empty-store")  # not the repo's default adapters_store
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--max-waiting", "256", "--num-threads", "1",
                         "--adapters-dir", str(store), "--allowed-adapter-roots", str(adapter_root)],
                        tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


def test_api_conforms_to_its_own_document(server, adapter_root, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "LORAMUX_FUZZ_MODEL": MODEL, "LORAMUX_FUZZ_ADAPTER_ROOT": str(adapter_root), "NO_COLOR": "1"}
    cli = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
           server.base_url + "/openapi.json", "--checks", "all", "--workers", "1", "--request-timeout", "60"]
    run = subprocess.run(cli, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    report = run.stdout[-20000:] + run.stderr[-5000:]
    assert run.returncode == 0, f"schemathesis found problems:\n{report}\nserver log:\n{server.log()}"
