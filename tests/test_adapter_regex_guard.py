"""Regexes from adapter configs (target_modules / exclude_modules as strings, layers_pattern,
rank_pattern / alpha_pattern keys) run in Python's `re`, which backtracks holding the GIL: one
catastrophic pattern in a tenant's upload would freeze the whole server. Bounded repeats
backtrack as much as unbounded ones once they repeat an alternation or another repeat: on a
module name of ~30 characters, `(.|.){1,64}x` is 2^30 paths (minutes), `(.*){8}x` n^8.
What real configs write is still accepted."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from server.adapters.errors import AdapterError
from server.adapters.regex_guard import compile_config_regex

KEY = "model.layers.12.self_attn.q_proj"


@pytest.mark.parametrize("pattern", [
    r"(.|.){1,64}x",  # before: accepted (a bounded repeat counted as safe up to 64)
    r"(?:.|.){2,40}x",
    r"(.*){8}x",  # before: accepted (the outer repeat is bounded)
    r"(.{0,40}){8}x",
    r"(\w+\.){1,10}x",
    "(.|.)" * 30 + "x",  # no repeat at all: 2^30 ways (before: accepted)
    r"(a|b|.){1,4}(a|b|.){1,4}(a|b|.){1,4}x",
    r"(.*)*x", r"(\w|_\w)*x",  # refused before too
])
def test_catastrophic_patterns_are_refused(pattern):
    with pytest.raises(AdapterError, match="catastrophic|backtracking"):
        compile_config_regex(pattern, what="target_modules", path=Path("adapter_config.json"))


@pytest.mark.parametrize("pattern", [
    r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj", r".*layers\.(0|1|2|3)\..*",
    r"^(?!.*vision).*(q_proj|v_proj)", r".*\.layers\.[02]\.(self_attn\.(q|o)_proj|mlp\.gate_proj)",
    r"(q|k){2}_proj", r"model\.layers\.\d{1,3}\..*", r"layers\.[0-9]{1,2}\.mlp\..*",
    r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    r".*\.layers\.(0|1|2|3|4|5|6|7|8|9|10|11)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj",
])
def test_what_configs_write_is_accepted_and_quick(pattern):
    regex = compile_config_regex(pattern, what="target_modules", path=Path("adapter_config.json"))
    t0 = time.perf_counter()
    for key in (KEY, KEY.replace("q_proj", "xx_proj"), "model.layers.3.mlp.down_proj"):
        regex.fullmatch(key)
    assert time.perf_counter() - t0 < 0.05
    assert isinstance(regex, re.Pattern)
