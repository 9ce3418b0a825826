"""server/engine/device.py: the model dtype a setting names. Only the dtypes the parity tests
compare with transformers are served; float16 and the short aliases were taken before without
a word in the help or a test behind them."""

from __future__ import annotations

import pytest
import torch

from server.engine.device import resolve_dtype


def test_named_dtypes_resolve_and_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16 and resolve_dtype("float32", cpu) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("name", ["float16", "fp16", "bf16", "fp32", "int8", ""])
def test_any_other_name_is_refused(name):
    with pytest.raises(ValueError, match="use auto, bfloat16 or float32"):
        resolve_dtype(name, torch.device("cpu"))
