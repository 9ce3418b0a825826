"""Rerun test modules' Triton tests in a child process (tests/triton_mode.py), one child for all.

Each child pays a Python start, the torch/transformers/triton imports and a collection (~5 s on
the 2-core CI machine) before its first test. The modules of a session that rerun the same way
(same keyword, same mode) therefore share one child: the first module's rerun runs them all,
and every module asserts only the outcomes of its own tests. Which modules those are is known
after collection (conftest.py's `pytest_collection_finish` calls `register`); no module waits
for another one, whichever asks first starts the child. This module imports nothing of triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The test that reruns its module in a child, in every module that has one.
RERUN_TEST = "test_triton_interp_in_subprocess"
KEYWORD = "triton_interp"  # what the child selects by default: the interpreter tests' names hold it
INTERP_SKIP = "Triton interpreter not active in-process"  # the reason of the modules' `needs_interp` mark
_session_files: set[str] = set()
_misnamed: set[str] = set()  # interpreter tests without KEYWORD in their names
_results: dict[tuple[str, bool], dict[str, list[tuple[str, str | None]]]] = {}  # (keyword, interpret) -> _run_child


def note_interp_tests(items) -> None:
    """Record interpreter tests (skipped with INTERP_SKIP when not in-process) named without
    KEYWORD, from all collected pytest items: the child selects them by name as well (a
    `-k triton_interp` alone skipped such tests silently in every run where triton came first)."""
    for i in items:
        if KEYWORD not in i.name and any(m.kwargs.get("reason") == INTERP_SKIP for m in i.iter_markers("skipif")):
            _misnamed.add(i.originalname)


def register(items) -> None:
    """Record the modules whose RERUN_TEST this session selected (pytest items)."""
    _session_files.update(str(Path(i.path).resolve()) for i in items if i.originalname == RERUN_TEST)


def rerun_in_child(test_file: str, keyword: str = KEYWORD, interpret: bool = True) -> None:
    """Run the tests of `test_file` matching `keyword` in a child, under the interpreter (or, with
    interpret=False, with kernels compiled for a GPU target: tests/sm90_aot.py); assert they pass
    (at least one ran, not skipped; none failed). With the default keyword and mode the child also runs the
    other registered modules, whose reruns then read their outcomes from it."""
    test_file = str(Path(test_file).resolve())
    key = (keyword, interpret)
    shared = key == (KEYWORD, True) and test_file in _session_files
    if shared and key in _results:
        outcomes = _results[key]
    else:
        selected = " or ".join([keyword, *sorted(_misnamed)]) if key == (KEYWORD, True) else keyword
        outcomes = _run_child(sorted(_session_files) if shared else [test_file], selected, interpret)
        if shared:
            _results[key] = outcomes
    mine = outcomes.get(test_file, [])
    assert mine, (f"no test of {test_file} matching {keyword!r} ran in the child (none, or all skipped):\n"
                  + outcomes.get("", [("", "")])[0][1])
    failed = [f"{name}:\n{text}" for name, text in mine if text is not None]
    assert not failed, "\n\n".join(failed)[-6000:]


def _run_child(files: list[str], keyword: str, interpret: bool) -> dict[str, list[tuple[str, str | None]]]:
    """file -> [(test name, None if it passed else the failure text)], skipped tests left out
    (the child skips the rerun test itself, which its keyword selects: it proves nothing ran); under
    "" the child's output when it did not finish its run."""
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0", _LORAMUX_CHILD="1")
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                            f"--junitxml={xml}", *files, "-k", keyword],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=300 * len(files))
        out = r.stdout[-4000:] + r.stderr[-2000:]
        if r.returncode not in (0, 1) or not xml.is_file():  # not a finished run with results
            return {"": [("", f"child exited with status {r.returncode}:\n{out}")]}
        outcomes: dict[str, list[tuple[str, str | None]]] = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            if case.find("skipped") is not None:
                continue
            bad = [e for e in case if e.tag in ("failure", "error")]
            text = "\n".join((e.get("message") or "") + "\n" + (e.text or "") for e in bad) if bad else None
            outcomes.setdefault(str((ROOT / case.get("file", "")).resolve()), []).append((case.get("name"), text))
    if r.returncode == 1 and not any(t is not None for v in outcomes.values() for _, t in v):
        return {"": [("", f"child failed without a failing test:\n{out}")]}
    return outcomes
