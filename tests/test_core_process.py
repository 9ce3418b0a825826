"""Unit checks of the engine core process's set-up (server/engine/core_process.py); the process
itself, over ZeroMQ, is tested end to end in tests/test_engine_process.py."""

from __future__ import annotations

import pytest

from server.config import Config
from server.engine import core_process


@pytest.mark.parametrize("cores, device, flag, want", [
    (2, "cpu", None, None),  # two cores: both shared (one torch thread would halve the engine)
    (4, "cpu", None, 3),  # one core left to the server process
    (16, "cpu", 8, 8),  # --num-threads wins
    (16, "cuda", None, None),  # the GPU does the engine's work
])
def test_the_core_leaves_a_core_to_the_server_above_two(monkeypatch, cores, device, flag, want):
    monkeypatch.setattr(core_process.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    config = Config()
    config.model.device, config.model.num_threads = device, flag
    core_process.reserve_a_core(config)
    assert config.model.num_threads == want
