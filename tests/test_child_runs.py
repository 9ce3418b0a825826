"""tests/child_runs.py: a module's rerun in the child passes only if some of its tests ran there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from child_runs import INTERP_SKIP, RERUN_TEST, rerun_in_child

# A module as the Triton ones are: its interpreter test, and its rerun test, which the child
# selects by the same keyword and skips (it is the child).
_PROBE = f'''
import os
import pytest

@pytest.mark.skipif({{skip}}, reason={INTERP_SKIP!r})
def test_kernel_triton_interp():
    assert {{result}}

@pytest.mark.skipif(os.environ.get("_LORAMUX_CHILD") == "1", reason="we are the child")
def {RERUN_TEST}():
    pass
'''


def _rerun(skip: bool, result: bool) -> None:
    # In tests/, as the real modules (the child's report names files relative to the repository).
    probe = Path(__file__).parent / f"_child_probe_{os.getpid()}.py"
    probe.write_text(_PROBE.format(skip=skip, result=result))
    try:
        rerun_in_child(str(probe))
    finally:
        probe.unlink()


def test_a_child_where_every_test_skipped_fails_the_rerun():
    # e.g. the interpreter not active in the child: nothing was tested, which must not pass
    with pytest.raises(AssertionError, match="ran in the child"):
        _rerun(skip=True, result=True)


def test_a_failing_test_in_the_child_fails_the_rerun_and_a_passing_one_passes():
    with pytest.raises(AssertionError, match="test_kernel_triton_interp"):
        _rerun(skip=False, result=False)
    _rerun(skip=False, result=True)
