"""loadtest/gpu_check.py keeps what a section measured when that section's process dies part-way:
the many-adapters section's rows reach the tables as they finish, so after a crash or a kill in
its second cell the first keeps its figures and the second reads "not finished" (as the decode
benchmark's rows do: docs/benchmarks.md section 4). On a GPU the check runs once: a measured row
must not be lost to a failure in the row after it. In-process, over a smaller smoke plan; the
process-level kill and crash paths are tests/test_gpu_check.py's."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest import gpu_check, gpu_many_adapters  # noqa: E402
from loadtest.gpu_systems import STARTED  # noqa: E402


class Died(BaseException):
    """The section's process dying where the test says (not an Exception: nothing catches it)."""


def test_a_section_that_dies_in_its_second_row_keeps_the_first(tmp_path, monkeypatch):
    plan = replace(gpu_many_adapters.SMOKE, cells=(gpu_many_adapters.Cell(2, 0.0), gpu_many_adapters.Cell(3, 1.0)),
                   streams=2, requests=2, new_tokens=2, distinct_files=2)
    monkeypatch.setattr(gpu_many_adapters, "SMOKE", plan)
    results = dict(many_adapters=None, notes=[])
    written = []  # what gpu_check.json held after each flush

    def flush() -> None:
        written.append(json.loads(json.dumps(results["many_adapters"], default=str)))
        rows = written[-1]["rows"] if written[-1] else []
        if rows and rows[1]["status"] == STARTED:
            raise Died  # a crash in the second cell
    budget = gpu_check.Budget(300)
    with pytest.raises(Died):
        gpu_check.section_body("many", gpu_check.SMOKE_PLAN, budget, budget.end, tmp_path, results, flush, True)
    first, second = written[-1]["rows"]
    assert first["status"] == "ok" and first["tokens_ok"] and first["output_tok_s"] > 0, first
    assert [s["rows"][0]["status"] for s in written[:2]] == [STARTED, "ok"]  # each state of the row, as it came

    # what the parent makes of the tables the dead process left
    left = dict(many_adapters=written[-1], notes=[])
    gpu_check.mark_unfinished("many", gpu_check.SMOKE_PLAN, True, left, "its process exited with status 3")
    died = "not finished: its process exited with status 3"
    assert [r["status"] for r in left["many_adapters"]["rows"]] == ["ok", died]
    md = "\n".join(gpu_many_adapters.markdown(left["many_adapters"]))
    assert died in md and "| exact |" in md
