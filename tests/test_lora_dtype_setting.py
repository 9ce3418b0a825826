"""--lora-dtype names the adapter pool's dtype: auto, float32 or bfloat16 (`loramux serve --help`).
Anything else stops the start with exit status 2 and one line naming the setting (docs/operator.md,
"Settings"), never a traceback, and never a pool of another dtype: `int8` used to start a server
whose pool truncated every adapter weight to an integer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.adapters.manager import pool_dtype

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["int8", "float16", "foo", "Tensor", ""])
def test_a_dtype_the_help_does_not_offer_is_refused_naming_the_setting(name):
    with pytest.raises(ValueError, match="--lora-dtype"):
        pool_dtype(name, torch.float32, torch.device("cpu"))
    # (what the offered names give: tests/test_lora_pool_in_place.py)


def test_serve_with_an_unknown_lora_dtype_exits_2_with_one_line(tiny_llama_dir):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_llama_dir),
                           "--num-threads", "1", "--port", "0", "--engine-process", "off", "--lora-dtype", "foo"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("loramux: bad configuration: --lora-dtype: expected one of "
                                                    "auto, float32, bfloat16, got 'foo'")
