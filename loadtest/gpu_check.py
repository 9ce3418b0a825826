"""The GPU check of issue 10, in one call: the GPU tests, then the decode benchmark on a random
Llama-3.1-8B-shaped bf16 model (weights made on the device, no download) against transformers,
PEFT mixed-adapter generate and the HBM floor (loramux with CUDA graphs for decode, and with
--enforce-eager at 1 and 64 streams), then issue 11's many-adapters scenario
(loadtest/gpu_many_adapters.py: 1,000 adapters at Zipf 1.0 against 8), then the Triton
micro-benchmarks. Under 8 minutes
on one H100/H200: every section has a time cap and the whole run a budget (~7.5 min); what does
not fit is skipped and the tables say so. Every section runs in a child process of its own, killed
if it is still running `grace_s` past its cap (a hung kernel, a deadlock), so one section's hang,
crash, sticky CUDA error or leftover GPU memory cannot take the others with it. Tables are
rewritten as every row (decode benchmark, many adapters) starts and ends and after every section, so a
killed run still leaves what it measured.

    python loadtest/gpu_check.py --out DIR          # default: $OUT, else ./gpu_check_out
    python loadtest/gpu_check.py --smoke --out DIR  # CPU, tiny model and counts, same code paths

Writes DIR/gpu_check.md and DIR/gpu_check.json (+ the logs of pytest, of each section and of the
micro-benchmarks). Exit status 1 if a test failed, a run returned other than the requested number
of tokens, or a section's process crashed or was killed at its cap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from loadtest import gpu_bench as gb  # noqa: E402
from loadtest import gpu_many_adapters  # noqa: E402
from loadtest.gpu_systems import STARTED, run_bench, units  # noqa: E402
from loadtest.gpu_report import render_markdown, targets  # noqa: E402

# Never run on a GPU first (the attention kernel, the engine), the kernels that ran on an H100 last.
GPU_TESTS = ("tests/test_triton_paged_attention.py", "tests/test_gpu_engine.py",
             "tests/test_lora_pool_in_place.py::test_loads_land_in_the_pool_and_steps_copy_nothing",
             "tests/test_step_upload.py",
             "tests/test_kernels.py", "tests/test_kernels_pages.py", "tests/test_lora_pages.py",
             "tests/test_kernels_mixture.py")  # rows, mixtures, routing, DoRA on CUDA: last, the cap may cut it
# Only the CUDA cases of those files: their CPU cases run in CI, and some (the C++ attention
# extension's first build, Triton compiles for sm_90 in a subprocess) would eat the section's cap;
# the SGMV kernels' float32 cases repeat their bf16 ones' launch paths (each a cold compile here).
GPU_TEST_FILTER = "(cuda or gpu) and not (triton_matches_reference and fp32)"


@dataclass(frozen=True)
class Plan:
    hf_config: dict
    device: str
    dtype: str  # the engine's --dtype
    streams: tuple[int, ...]
    adapter_counts: tuple[int, ...]  # distinct adapters of the LoRA rows (the issue: 8 and 64)
    target_streams: int  # where the batch targets are read (64)
    prompt_len: int
    new_tokens: int
    repeats: int
    copy_bytes: int  # size of the bandwidth-measuring copy
    test_files: tuple[str, ...]
    total_s: float  # the whole run's budget
    caps: dict[str, float]  # per-section caps, seconds
    min_unit_s: float  # a benchmark unit is not started with less than this left in its section
    grace_s: float  # a section's process still running this long past its cap is killed


GPU_PLAN = Plan(hf_config=gb.LLAMA_8B, device="cuda", dtype="bfloat16", streams=(1, 8, 64, 256),
                adapter_counts=(8, 64), target_streams=64, prompt_len=128, new_tokens=32, repeats=1,
                copy_bytes=1 << 30, test_files=GPU_TESTS, total_s=450,
                caps=dict(tests=140, bench=185, many=70, attention=25, pages=20, kernels=10), min_unit_s=12,
                grace_s=20)
SMOKE_PLAN = Plan(hf_config=gb.TINY, device="cpu", dtype="float32", streams=(1, 4), adapter_counts=(2, 4),
                  target_streams=4, prompt_len=8, new_tokens=8, repeats=1, copy_bytes=16 << 20,
                  test_files=("tests/test_gpu_engine.py",), total_s=210,
                  caps=dict(tests=60, bench=90, many=60, attention=10, pages=10, kernels=10), min_unit_s=0,
                  grace_s=30)
MICRO = {
    "attention": ["loadtest/bench_attention.py", "--backend", "triton", "--repeats", "10"],
    "pages": ["loadtest/bench_pages.py", "--reps", "10"],  # the paged pool's cost to the SGMV kernels
    "kernels": ["loadtest/bench_kernels.py", "--device", "cuda", "--models", "big", "--reps", "10"],
}


class Budget:
    """The run's deadline, and each section's: min(its cap from now, the run's end).
    `end`: the run's end as a clock value (a section's child process continues its parent's run;
    time.monotonic is one clock for every process of the machine)."""

    def __init__(self, total_s: float, clock=time.monotonic, end: float | None = None):
        self.clock = clock
        self.end = clock() + total_s if end is None else end

    def left(self) -> float:
        return self.end - self.clock()

    def section(self, cap_s: float) -> float:
        """The section's deadline (a clock value)."""
        return min(self.clock() + cap_s, self.end)


# --- running things in a child process with a time limit -------------------------------------------


def run_child(argv: list[str], log: Path, timeout_s: float) -> tuple[int | None, float]:
    """Run `argv` from the repo root, output to `log`; kill its whole process group at the
    timeout. -> (exit status, None if killed; seconds)."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.monotonic() - t0


TEST_LINE = re.compile(r"^(tests/\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def run_tests(plan: Plan, budget: Budget, out: Path) -> dict:
    deadline = budget.section(plan.caps["tests"])
    log = out / "pytest.log"
    argv = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "--durations=20",
            "-k", GPU_TEST_FILTER, *plan.test_files]
    rc, seconds = run_child(argv, log, deadline - budget.clock())
    text = log.read_text(errors="replace")
    counts = {k: 0 for k in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")}
    failed = []
    for name, outcome in TEST_LINE.findall(text):
        counts[outcome] += 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(name)
    status = "timed out (section cap): counts are of the tests that finished" if rc is None else f"exit {rc}"
    return dict(files=list(plan.test_files), status=status, exit=rc, seconds=round(seconds, 1),
                passed=counts["PASSED"], failed=counts["FAILED"] + counts["XPASS"], errors=counts["ERROR"],
                skipped=counts["SKIPPED"] + counts["XFAIL"], failures=failed, log=log.name,
                ok=rc in (0, 5) and not failed)


def run_micro(name: str, plan: Plan, budget: Budget, out: Path, cuda: bool) -> dict:
    if not cuda:
        return dict(name=name, status="skipped: needs a CUDA device", lines=[])
    deadline = budget.section(plan.caps[name])
    if deadline - budget.clock() < 5:
        return dict(name=name, status="skipped: run budget spent", lines=[])
    log = out / f"bench_{name}.log"
    argv = [*MICRO[name], "--out", str(out)] if name != "attention" else MICRO[name]  # its table file
    rc, seconds = run_child([sys.executable, *argv], log, deadline - budget.clock())
    status = "cut at its time cap: the rows below are the ones it finished" if rc is None else f"exit {rc}"
    lines = log.read_text(errors="replace").splitlines()
    return dict(name=name, command=" ".join(["python", *MICRO[name]]), status=status, seconds=round(seconds, 1),
                lines=lines[-80:], log=log.name)


# --- main ------------------------------------------------------------------------------------------


def environment(plan: Plan, smoke: bool) -> dict:
    env = dict(mode="smoke (CPU, tiny model)" if smoke else "GPU", torch=torch.__version__, device=plan.device,
               model=("Llama-3.1-8B shape, random weights" if not smoke else "tiny Llama, random weights"),
               dtype=plan.dtype, prompt_len=plan.prompt_len, new_tokens=plan.new_tokens, repeats=plan.repeats,
               streams=list(plan.streams), adapter_counts=list(plan.adapter_counts), lora_rank=gb.LORA_RANK,
               budget_s=plan.total_s, caps_s=plan.caps)
    env["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None  # a copy of the tree without .git
    if plan.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def work_dir() -> Path:
    """Adapters are written to tmpfs when it has room (they are read back at once)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 8 << 30 else None
    return Path(tempfile.mkdtemp(prefix="gpu_check-", dir=base))


# --- the in-process sections, each in a child process ----------------------------------------------

SECTIONS = {"bench": "decode benchmark", "many": "many-adapters section"}
FAULT_ENV = "LORAMUX_GPU_CHECK_FAULT"  # tests only: "hang:<section>" / "exit:<section>" (see _fault)


def many_plan(smoke: bool) -> gpu_many_adapters.Plan:
    return gpu_many_adapters.SMOKE if smoke else gpu_many_adapters.GPU


def write_tables(out: Path, results: dict, plan: Plan, budget: Budget) -> None:
    """gpu_check.json and gpu_check.md from `results`, each replaced whole (a process killed
    while writing leaves the previous version, never half a file)."""
    results["targets"] = targets(results["rows"], plan.adapter_counts[0], plan.target_streams)
    results["elapsed_s"] = round(plan.total_s - budget.left(), 1)
    for name, text in (("gpu_check.json", json.dumps(results, indent=1, default=str)),
                       ("gpu_check.md", render_markdown(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def run_section(name: str, plan: Plan, budget: Budget, out: Path, work: Path, smoke: bool, results: dict,
                flush) -> bool:
    """Section `name` in a child process (`--section`), which reads the tables, adds its part and
    rewrites them as it goes; killed if still running `plan.grace_s` past the section's deadline.
    Then its part is read back into `results`. -> False if the child crashed or was killed."""
    deadline = budget.section(plan.caps[name])
    least = plan.min_unit_s if name == "bench" else many_plan(smoke).min_cell_s  # what one row needs
    if deadline - budget.clock() < max(least, 0.01):  # nothing can run: the rows say why, no process, no CUDA
        section_body(name, plan, budget, deadline, work, results, flush, smoke)
        return True
    flush()  # the child starts from what is measured so far
    log = out / f"section_{name}.log"
    argv = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out), "--work", str(work),
            "--deadline", repr(deadline), "--run-end", repr(budget.end), "--budget-s", repr(plan.total_s),
            *(["--smoke"] if smoke else []), *[f"--cap={k}={v}" for k, v in plan.caps.items()]]
    rc, seconds = run_child(argv, log, deadline - budget.clock() + plan.grace_s)
    print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]), end="", flush=True)
    child = json.loads((out / "gpu_check.json").read_text())
    for key in ("setup", "floor", "rows", "many_adapters", "notes"):
        results[key] = child[key]
    if rc == 0:
        return True
    what = (f"killed {plan.grace_s:.0f} s past its cap ({seconds:.0f} s)" if rc is None else
            f"its process exited with status {rc}")
    results["notes"].append(f"{SECTIONS[name]}: {what}; rows it did not record are marked, see {log.name}")
    mark_unfinished(name, plan, smoke, results, what)
    flush()
    return False


def mark_unfinished(name: str, plan: Plan, smoke: bool, results: dict, what: str) -> None:
    """After section `name`'s process died (`what`): the row it was running reads "not finished",
    the rows it never started "not run"; the rows it recorded as finished stand."""
    if name == "bench":
        seen = {(r["system"], r["adapters"], r["streams"]) for r in results["rows"]}
        for row in results["rows"]:
            if row["status"] == STARTED:
                row["status"] = f"not finished: {what}"
        results["rows"] += [dict(asdict(u), status=f"not run: {what}", tok_s=None, floor_tok_s=None, tokens_ok=None,
                                 seconds=None, step_bytes=None)
                            for u in units(plan) if (u.system, u.adapters, u.streams) not in seen]
    elif results["many_adapters"] is None:
        results["many_adapters"] = gpu_many_adapters.not_run(many_plan(smoke), f"not run: {what}")
    else:  # the child recorded its rows as it went
        for row in results["many_adapters"]["rows"]:
            if row["status"] == STARTED:
                row["status"] = f"not finished: {what}"
            elif row["status"] == "not run":
                row["status"] = f"not run: {what}"


def section_body(name: str, plan: Plan, budget: Budget, deadline: float, work: Path, results: dict, flush,
                 smoke: bool) -> None:
    """What a section's child runs (or its parent, when there is no time left: rows marked skipped)."""
    if name == "bench":
        print("decode benchmark ...", flush=True)
        try:
            run_bench(plan, budget, deadline, work, results, flush)
        except Exception as exc:
            traceback.print_exc()
            results["notes"].append(f"decode benchmark stopped: {type(exc).__name__}: {str(exc)[:300]}")
    else:
        print("many adapters ...", flush=True)

        def row_recorded(many: dict) -> None:  # into the tables now: a process killed later keeps it
            results["many_adapters"] = many
            flush()
        try:
            results["many_adapters"] = gpu_many_adapters.run(many_plan(smoke), deadline, work, on_row=row_recorded)
        except Exception as exc:
            traceback.print_exc()
            results["notes"].append(f"many-adapters section stopped: {type(exc).__name__}: {str(exc)[:300]}")
    flush()


def _fault(section: str) -> None:
    """Tests of the kill path only: FAULT_ENV "hang:<section>" makes that section's child hang,
    "exit:<section>" makes it die (as a crash in a CUDA library would), before it measures anything."""
    kind, _, where = os.environ.get(FAULT_ENV, "").partition(":")
    if where == section and kind == "hang":
        while True:
            time.sleep(1)
    if where == section and kind == "exit":
        os._exit(3)


def section_main(args, plan: Plan) -> int:
    """The child of `run_section`: continue the parent's run (its tables, its clock)."""
    out = Path(args.out)
    budget = Budget(plan.total_s, end=args.run_end)
    results = json.loads((out / "gpu_check.json").read_text())
    _fault(args.section)
    section_body(args.section, plan, budget, args.deadline, Path(args.work), results,
                 lambda: write_tables(out, results, plan, budget), args.smoke)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="directory for the tables")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model and counts: the control flow only")
    ap.add_argument("--budget-s", type=float, help="override the whole run's time budget (seconds)")
    ap.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS",
                    help="override a section's time cap (tests, bench, many, attention, pages, kernels)")
    ap.add_argument("--grace-s", type=float, help="override how long past its cap a section's process may run")
    ap.add_argument("--skip-tests", action="store_true")
    # a section's child process (run_section)
    ap.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--run-end", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    if args.budget_s is not None:
        plan = replace(plan, total_s=args.budget_s)
    if args.grace_s is not None:
        plan = replace(plan, grace_s=args.grace_s)
    for item in args.cap:
        key, _, value = item.partition("=")
        if key not in plan.caps:
            ap.error(f"--cap {item}: no section {key!r} (have {', '.join(plan.caps)})")
        plan = replace(plan, caps={**plan.caps, key: float(value)})
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); --smoke runs on CPU")
        return 2
    if args.section:
        return section_main(args, plan)
    budget = Budget(plan.total_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = dict(environment=environment(plan, args.smoke), tests=None, setup={}, floor=None, rows=[],
                         targets=[], many_adapters=None, micro=[], notes=[])

    def flush() -> None:
        write_tables(out, results, plan, budget)

    print(f"gpu_check: {results['environment']['mode']}, budget {plan.total_s:.0f} s, tables in {out}", flush=True)
    if args.skip_tests:
        results["notes"].append("tests skipped (--skip-tests)")
    else:
        print("tests ...", flush=True)
        results["tests"] = run_tests(plan, budget, out)
        flush()
    work = work_dir()
    sections_ok = True
    try:
        for name in SECTIONS:
            sections_ok &= run_section(name, plan, budget, out, work, args.smoke, results, flush)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    flush()
    for name in MICRO:
        print(f"micro-benchmark {name} ...", flush=True)
        results["micro"].append(run_micro(name, plan, budget, out, plan.device == "cuda"))
        flush()
    if budget.left() < 0:
        results["notes"].append(f"the run went {-budget.left():.0f} s past its budget")
    flush()
    print((out / "gpu_check.md").read_text())
    tokens_bad = any(r["tokens_ok"] is False for r in results["rows"])
    tests_bad = results["tests"] is not None and not results["tests"]["ok"]
    many_bad = results["many_adapters"] is not None and gpu_many_adapters.tokens_bad(results["many_adapters"])
    return 1 if tokens_bad or tests_bad or many_bad or not sections_ok else 0


if __name__ == "__main__":
    sys.exit(main())
