"""loadtest/bench_experts.py (issue 12's benchmark) runs end to end in its --smoke shape: the PEFT
side alone, and both sides (a real loramux server serving mixtures, routes and DoRA)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # loadtest/ is a directory of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from loadtest import bench_experts  # noqa: E402

CASES = ["base", "single", "mix2", "mix4", "arrow3of8", "dora"]


def run(tmp_path: Path, *flags: str) -> tuple[int, list[dict]]:
    out = tmp_path / "rows.json"
    rc = bench_experts.main(["--smoke", "--threads", "1", "--out", str(out), *flags])
    return rc, json.loads(out.read_text())["rows"]


def test_smoke_peft_side(tmp_path, capsys):
    rc, rows = run(tmp_path, "--side", "peft")
    assert rc == 0
    assert [r["case"] for r in rows] == CASES
    assert all(r["peft_tok_s"] > 0 and r["loramux_tok_s"] is None for r in rows)
    printed = capsys.readouterr().out
    assert "arrow3of8" in printed and "vs PEFT" in printed


def test_smoke_both_sides(tmp_path):
    rc, rows = run(tmp_path)
    for r in rows:  # every request got its tokens, and the request fields changed the output
        assert r["n_errors"] == 0, (r["case"], r["errors"])
        assert r["applied"], r["case"]
        assert r["loramux_tok_s"] > 0 and r["peft_tok_s"] > 0
        assert r["case"] == "base" or r["vs_peft"] is not None
    assert rc == 0
