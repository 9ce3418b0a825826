"""gpu_check.py's tables: the issue-10 target ratios read off the benchmark rows, and the
markdown report. Pure functions of the results dict (also what gpu_check.json holds)."""

from __future__ import annotations

from loadtest.gpu_many_adapters import markdown as many_adapters_markdown

TARGETS = (
    # (name, how it is read, target, True if higher is better)
    ("single-stream decode vs HBM floor", "loramux base-only, 1 stream: tok/s / floor tok/s", 0.70, True),
    ("{B} streams x {A} adapters vs own base-only", "loramux tok/s: {A} adapters / base-only, {B} streams", 0.80,
     True),
    ("vs PEFT mixed batch, {B} streams x {A} adapters", "loramux tok/s / PEFT generate tok/s", 10.0, True),
    ("TPOT, LoRA enabled vs --no-lora (base-only), 1 stream", "time per token: LoRA enabled / --no-lora", 1.05,
     False),
    ("TPOT, LoRA enabled vs --no-lora (base-only), {B} streams", "time per token: LoRA enabled / --no-lora", 1.05,
     False),
)


def _tps(rows: list[dict], system: str, adapters: int, streams: int) -> float | None:
    for r in rows:
        if (r["system"], r["adapters"], r["streams"]) == (system, adapters, streams) and r["tok_s"]:
            return r["tok_s"]
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(rows: list[dict], adapters: int, streams: int) -> list[dict]:
    """The issue's four targets (TPOT at two batch sizes); value None where a row is missing."""
    floor = next((r["floor_tok_s"] for r in rows if (r["system"], r["adapters"], r["streams"]) == ("loramux", 0, 1)),
                 None)
    values = [
        _ratio(_tps(rows, "loramux", 0, 1), floor),
        _ratio(_tps(rows, "loramux", adapters, streams), _tps(rows, "loramux", 0, streams)),
        _ratio(_tps(rows, "loramux", adapters, streams), _tps(rows, "peft", adapters, streams)),
        _ratio(_tps(rows, "loramux --no-lora", 0, 1), _tps(rows, "loramux", 0, 1)),
        _ratio(_tps(rows, "loramux --no-lora", 0, streams), _tps(rows, "loramux", 0, streams)),
    ]
    out = []
    for (name, how, goal, higher), value in zip(TARGETS, values):
        met = None if value is None else (value >= goal if higher else value <= goal)
        out.append(dict(name=name.format(A=adapters, B=streams), how=how.format(A=adapters, B=streams),
                        target=(">= " if higher else "<= ") + f"{goal:g}", value=value, met=met))
    return out


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _beside_loramux(rows: list[dict], title: str, system: str, names: tuple[str, str], system_first: bool,
                    intro: str) -> list[str]:
    """A table of `system`'s rows beside loramux's (defaults) at the same adapters and streams:
    tok/s of names[0] over names[1] (`system` is names[0] when `system_first`)."""
    lines = ["", f"## {title}", "", intro, "",
             f"| adapters | streams | {names[0]} tok/s | {names[1]} tok/s | {names[0]} / {names[1]} |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["system"] == system:
            default = _tps(rows, "loramux", r["adapters"], r["streams"])
            a, b = (r["tok_s"], default) if system_first else (default, r["tok_s"])
            lines.append(f"| {r['adapters'] or 'base'} | {r['streams']} | {_num(a)} | {_num(b)} | "
                         f"{_num(_ratio(a, b), '.2f')} |")
    return lines


def render_markdown(res: dict) -> str:
    env = res["environment"]
    lines = ["# loramux GPU check", "",
             " · ".join(f"{k} {v}" for k, v in env.items() if k not in ("caps_s",)),
             f"elapsed {res.get('elapsed_s', '-')} s of a {env['budget_s']:.0f} s budget; section caps "
             + ", ".join(f"{k} {v:.0f} s" for k, v in env["caps_s"].items()), ""]
    lines += ["## Tests", ""]
    t = res.get("tests")
    if t is None:
        lines += ["not run", ""]
    else:
        lines += [f"`pytest {' '.join(t['files'])}`: {t['status']}, {t['seconds']} s", "",
                  "| passed | failed | errors | skipped |", "| --- | --- | --- | --- |",
                  f"| {t['passed']} | {t['failed']} | {t['errors']} | {t['skipped']} |", ""]
        lines += [f"- FAILED {name}" for name in t["failures"]] + ([""] if t["failures"] else [])
    lines += ["## Decode benchmark", ""]
    floor = res.get("floor")
    if floor:
        lines += [f"HBM floor: bytes each decode step must read (weights + the step's distinct adapters + K/V of "
                  f"{floor['context']:g} positions per stream) over the copy bandwidth measured here, "
                  f"{floor['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write bytes of a "
                  f"{floor['copy_bytes'] >> 20} MiB device-to-device copy).", ""]
    if res.get("setup"):
        lines += ["Setup: " + "; ".join(f"{k} {v} s" for k, v in res["setup"].items()), ""]
    lines += ["| system | adapters | streams | tok/s | floor tok/s | vs floor | vs own base-only | tokens | row s | status |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = res["rows"]
    order = {"loramux": 0, "loramux --no-lora": 1, "loramux --enforce-eager": 2, "loramux --async-scheduling": 3,
             "transformers": 4, "peft": 5}
    for r in sorted(rows, key=lambda r: (order.get(r["system"], 9), r["adapters"], r["streams"])):
        base_system = "transformers" if r["system"] == "peft" else r["system"]
        own = _ratio(r["tok_s"], _tps(rows, base_system, 0, r["streams"])) if r["adapters"] else None
        tokens = {True: "exact", False: "WRONG", None: "-"}[r["tokens_ok"]]
        lines.append(f"| {r['system']} | {r['adapters'] or 'base'} | {r['streams']} | {_num(r['tok_s'])} | "
                     f"{_num(r['floor_tok_s'])} | {_num(_ratio(r['tok_s'], r['floor_tok_s']), '.2f')} | "
                     f"{_num(own, '.2f')} | {tokens} | {_num(r['seconds'])} | {r['status']} |")
    lines += _beside_loramux(rows, "CUDA graphs", "loramux --enforce-eager", ("graphs", "eager"), False,
                             "Decode tok/s of loramux (CUDA graphs for decode steps, the default) over "
                             "`loramux --enforce-eager` (every step eager), same adapters and streams.")
    lines += _beside_loramux(rows, "Async scheduling", "loramux --async-scheduling", ("async", "sync"), True,
                             "Decode tok/s of `loramux --async-scheduling` (step N+1 scheduled and launched before "
                             "step N's tokens are taken in) over loramux (synchronous), same engine, adapters and "
                             "streams.")
    lines += ["", "## Targets (issue 10)", "", "| target | read as | goal | value | met |",
              "| --- | --- | --- | --- | --- |"]
    for g in res["targets"]:
        met = {True: "yes", False: "NO", None: "not measured"}[g["met"]]
        lines.append(f"| {g['name']} | {g['how']} | {g['target']} | {_num(g['value'], '.2f')} | {met} |")
    lines.append("")
    if res.get("many_adapters"):
        lines += many_adapters_markdown(res["many_adapters"])
    lines += ["## Micro-benchmarks", ""]
    for m in res["micro"]:
        lines += [f"### {m['name']}: {m['status']}" + (f", {m['seconds']} s" if "seconds" in m else ""), ""]
        if m.get("command"):
            lines += [f"`{m['command']}`", ""]
        if m["lines"]:
            lines += ["```", *m["lines"], "```", ""]
    if res["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in res["notes"]], ""]
    return "\n".join(lines) + "\n"
