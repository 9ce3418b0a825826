"""Expert-library throughput (issue 12): 32 streams on the default model, each request
(a) one adapter, (b) a mixture of 2 and of 4, (c) Arrow top-3 over a library of 8, (d) DoRA, and
base-only; loramux (a real server, the HTTP fields) beside PEFT doing the same thing itself.

loramux: one server (`--dtype float32`, every adapter registered with --lora-modules); per case,
`--streams` concurrent non-streaming completions of `--max-tokens` tokens (ignore_eos, greedy), with
`adapters: [{"id", "weight"}]` / `route: {"experts", "top_k"}` in the body and `model` = the base.
Every request must return exactly its tokens, and each case's texts must differ from base-only's
(a field the server ignored would otherwise pass as a fast mixture).
PEFT: the same case as PEFT runs it (PeftModel / add_weighted_adapter "cat" / create_arrow_model /
a DoRA adapter), one batched greedy `generate` of the same prompts, left-padded, fp32. PEFT's Arrow
runs every expert on every token and then weights them; its DoRA recomputes ||W + s B A|| in every
forward (PEFT's default, `peft.tuners.lora.dora.ENABLE_DORA_CACHING = False`): that is PEFT's own
implementation, which the issue's ">= 3x PEFT" target is measured against.
Both sides: tok/s = streams x max_tokens / wall seconds of the whole batch (prompts included),
median of --repeats. Adapters: rank --rank on all seven projections, random with a spectral gap
(tests/peft_experts.py make_expert), one of them DoRA.

    python -m loadtest.bench_experts                     # the issue's run (minutes; all cores)
    python -m loadtest.bench_experts --side peft --streams 8 --max-tokens 16
    python -m loadtest.bench_experts --smoke             # a tiny random model, seconds (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:  # the adapter makers, PEFT oracles and server launcher live there
    sys.path.insert(0, str(ROOT / "tests"))

from peft_experts import Arrow, Mix, make_expert, reference_model  # noqa: E402

LIBRARY = 8
TOPICS = ["the capital of France", "autumn leaves", "photosynthesis", "copper", "the blue sky", "cooking",
          "compilers", "cats", "the ocean", "prime numbers", "trains", "coffee"]


@dataclass(frozen=True)
class Case:
    name: str
    adapter: str | None = None  # `model` of the request (None: the base)
    extra: dict = field(default_factory=dict)  # request fields beside `model`
    job: object = None  # the PEFT side's job (tests/peft_experts.py)


def cases(paths: dict[str, Path]) -> list[Case]:
    lib = [f"lib-{i}" for i in range(LIBRARY)]

    def mix(names: list[str], weights: list[float]) -> Case:
        return Case(f"mix{len(names)}", extra={"adapters": [{"id": n, "weight": w} for n, w in zip(names, weights)]},
                     job=Mix(tuple(paths[n] for n in names), tuple(weights)))

    return [Case("base"),
            Case("single", adapter=lib[0], job=paths[lib[0]]),
            mix(lib[:2], [0.7, 0.3]),
            mix(lib[:4], [0.4, 0.3, 0.2, 0.1]),
            Case("arrow3of8", extra={"route": {"experts": lib, "top_k": 3}},
                 job=Arrow(tuple(paths[n] for n in lib), top_k=3)),
            Case("dora", adapter="dora-0", job=paths["dora-0"])]


def library_paths(out: Path) -> dict[str, Path]:
    return {**{f"lib-{i}": out / f"lib-{i}" for i in range(LIBRARY)}, "dora-0": out / "dora-0"}


def make_library(model_dir: Path, paths: dict[str, Path], rank: int, std: float) -> None:
    """The adapters in `paths` (a subset of library_paths): random, spectral gap, `dora-0` DoRA."""
    for name, path in paths.items():
        seed = int(name.rsplit("-", 1)[1]) + (100 if name.startswith("dora") else 0)  # whatever the subset
        make_expert(model_dir, path, seed=seed, r=rank, lora_alpha=2 * rank, std=std, use_dora=name.startswith("dora"))


def _uses(all_cases: list[Case], name: str) -> bool:
    """Whether any case sends adapter `name` (only those are registered: a server that refuses one
    at start would fail every case)."""
    return any(name == c.adapter or f'"{name}"' in json.dumps(c.extra) for c in all_cases)


def prompts(n: int) -> list[str]:
    return [f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})." for i in range(n)]


# ---------------------------------------------------------------------------------------- loramux

@dataclass
class Round:
    wall_s: float
    texts: list[str]
    errors: list[str]  # one line per request that failed or came back short


async def _round(base_url: str, base: str, case: Case, texts: list[str], max_tokens: int) -> Round:
    import httpx

    async def one(client, prompt: str) -> tuple[str, str | None]:
        body = {"model": case.adapter or base, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, **case.extra}
        resp = await client.post("/v1/completions", json=body)
        if resp.status_code != 200:
            return "", f"HTTP {resp.status_code}: {resp.text[:300]}"
        obj = resp.json()
        got = obj["usage"]["completion_tokens"]
        return obj["choices"][0]["text"], None if got == max_tokens else f"{got} tokens, not {max_tokens}"

    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=600.0,
                                 limits=httpx.Limits(max_connections=len(texts))) as client:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(client, p) for p in texts))
        wall = time.perf_counter() - t0
    return Round(wall, [t for t, _ in out], [e for _, e in out if e])


async def _base_id(base_url: str) -> str:
    import httpx

    from loadtest.run import fetch_models

    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=30.0) as client:
        return (await fetch_models(client))[0]


def loramux_side(model_dir: Path, paths: dict[str, Path], all_cases: list[Case], a, log: Path) -> dict[str, dict]:
    from server_process import ServerProcess  # the launcher the tests use

    args = ["--model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--num-threads", str(a.threads),
            "--max-lora-rank", str(a.rank), "--kv-cache-memory", a.kv_cache, "--max-num-seqs", str(max(a.streams, 8)),
            "--lora-modules", *(f"{n}={p}" for n, p in paths.items())]
    srv = ServerProcess(args, log)
    rows: dict[str, dict] = {}
    try:
        base = asyncio.run(_base_id(srv.base_url))
        texts = prompts(a.streams)
        for case in all_cases:
            warm = asyncio.run(_round(srv.base_url, base, case, texts[:2], 2))  # adapter loads, prototypes
            rounds = [] if warm.errors else [asyncio.run(_round(srv.base_url, base, case, texts, a.max_tokens))
                                             for _ in range(a.repeats)]
            errors = warm.errors + [e for r in rounds for e in r.errors]
            tps = statistics.median(a.streams * a.max_tokens / r.wall_s for r in rounds) if rounds else None
            rows[case.name] = {"tok_s": None if errors else tps, "errors": errors[:3], "n_errors": len(errors),
                               "texts": rounds[0].texts if rounds else []}
            print(f"  loramux {case.name:<10} {_fmt(rows[case.name]['tok_s'])} tok/s"
                  f"{'  ' + errors[0] if errors else ''}", flush=True)
    finally:
        srv.stop()
    base_texts = rows["base"]["texts"]
    for name, row in rows.items():  # the request fields took effect: outputs moved off the base's
        row["applied"] = name == "base" or (bool(row["texts"]) and row["texts"] != base_texts)
    return rows


# ------------------------------------------------------------------------------------------- PEFT

def peft_side(model_dir: Path, all_cases: list[Case], a) -> dict[str, dict]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pad = tok.pad_token_id
    batch = tok(prompts(a.streams), return_tensors="pt", padding=True, padding_side="left")

    def generate(model, n: int, rows: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=batch.input_ids[:rows], attention_mask=batch.attention_mask[:rows],
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        assert out.shape == (rows, batch.input_ids.shape[1] + n), out.shape
        return time.perf_counter() - t0

    rows: dict[str, dict] = {}
    for case in all_cases:
        model = reference_model(model_dir, case.job)
        generate(model, 1, 2)  # Arrow builds its prototypes on the first forward: not timed
        tps = statistics.median(a.streams * a.max_tokens / generate(model, a.max_tokens, a.streams)
                                for _ in range(a.repeats))
        rows[case.name] = {"tok_s": tps}
        print(f"  PEFT    {case.name:<10} {_fmt(tps)} tok/s", flush=True)
        del model
    return rows


# ------------------------------------------------------------------------------------------ table

def _fmt(x: float | None, spec: str = "8.1f", suffix: str = "") -> str:
    """`x` formatted, or '-' right-aligned to the same width."""
    width = int(spec.split(".")[0] or 0) + len(suffix)
    return f"{'-':>{width}}" if x is None else f"{x:{spec}}{suffix}"


def summarize(names: list[str], ours: dict[str, dict], peft: dict[str, dict]) -> list[dict]:
    """Per case: tok/s both sides, ratios vs base-only / single adapter / PEFT, and the LoRA overhead
    per token (1/tps - 1/tps_base) as a multiple of the single adapter's."""
    def tps(side: dict, name: str) -> float | None:
        return (side.get(name) or {}).get("tok_s")

    base, single = tps(ours, "base"), tps(ours, "single")
    rows = []
    for name in names:
        t, p = tps(ours, name), tps(peft, name)
        over = None
        if t and base and single and name != "base" and 1 / single - 1 / base > 0:
            over = (1 / t - 1 / base) / (1 / single - 1 / base)
        row = {"case": name, "loramux_tok_s": t, "peft_tok_s": p,
               "vs_base": t / base if t and base else None, "vs_single": t / single if t and single else None,
               "overhead_x_single": over, "vs_peft": t / p if t and p else None}
        if name in ours:
            row.update(applied=ours[name]["applied"], n_errors=ours[name]["n_errors"], errors=ours[name]["errors"])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'case':<10} | {'loramux':>8} | {'vs base':>7} | {'vs single':>9} | {'overhead':>8} | "
             f"{'PEFT':>8} | {'vs PEFT':>7}",
             f"{'':<10} | {'tok/s':>8} | {'':>7} | {'':>9} | {'x single':>8} | {'tok/s':>8} | {'':>7}"]
    for r in rows:
        lines.append(f"{r['case']:<10} | {_fmt(r['loramux_tok_s'])} | {_fmt(r['vs_base'], '6.2f', 'x')} | "
                     f"{_fmt(r['vs_single'], '8.2f', 'x')} | {_fmt(r['overhead_x_single'], '7.2f', 'x')} | "
                     f"{_fmt(r['peft_tok_s'])} | {_fmt(r['vs_peft'], '6.1f', 'x')}")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each 'ok' / 'MISSED' / '-' (not measured)."""
    by = {r["case"]: r for r in rows}

    def verdict(x: float | None, ok: bool) -> str:
        return "-" if x is None else ("ok" if ok else "MISSED")

    out = []
    for k in (2, 4):
        o = by.get(f"mix{k}", {}).get("overhead_x_single")
        out.append(f"mixture of {k}: LoRA overhead {_fmt(o, '.2f', 'x')} single's (<= {k}x): "
                   f"{verdict(o, o is not None and o <= k)}")
    v = by.get("arrow3of8", {}).get("vs_single")
    out.append(f"Arrow top-3 of 8: {_fmt(v, '.2f', 'x')} single-adapter throughput (>= 0.5x): "
               f"{verdict(v, v is not None and v >= 0.5)}")
    for r in rows:
        if r["case"] != "base":
            v = r["vs_peft"]
            out.append(f"{r['case']}: {_fmt(v, '.1f', 'x')} PEFT (>= 3x): {verdict(v, v is not None and v >= 3)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model directory (default: the default model)")
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama, 4 streams x 8 tokens, rank 4 (CI)")
    p.add_argument("--side", choices=["both", "loramux", "peft"], default="both")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--std", type=float, default=0.02, help="std of the random A and B")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    p.add_argument("--kv-cache", default="1GiB", help="the server's --kv-cache-memory")
    p.add_argument("--cases", default="", help="comma-separated subset of: base,single,mix2,mix4,arrow3of8,dora")
    p.add_argument("--out", type=Path, help="write the rows (JSON) here")
    a = p.parse_args(argv)
    if a.smoke:
        a.streams, a.max_tokens, a.rank, a.repeats, a.std, a.kv_cache = 4, 8, 4, 1, 0.15, "64MiB"
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench-experts-") as tmp:
        tmp_path = Path(tmp)
        if a.smoke:
            from conftest import save_tiny_model

            model_dir = save_tiny_model(tmp_path / "tiny", "llama")
        elif a.model:
            model_dir = a.model
        else:
            from server.model.default_model import ensure_default_model

            model_dir = ensure_default_model()
        paths = library_paths(tmp_path / "adapters")
        wanted = set(filter(None, a.cases.split(",")))
        all_cases = [c for c in cases(paths) if not wanted or c.name in wanted | {"base", "single"}]
        paths = {n: p for n, p in paths.items() if _uses(all_cases, n)}
        make_library(model_dir, paths, a.rank, a.std)
        print(f"model {model_dir.name}  {a.streams} streams x {a.max_tokens} tokens  rank {a.rank}  "
              f"threads {a.threads}  repeats {a.repeats}", flush=True)
        ours = (loramux_side(model_dir, paths, all_cases, a, tmp_path / "server.log")
                if a.side != "peft" else {})
        peft = peft_side(model_dir, all_cases, a) if a.side != "loramux" else {}
    rows = summarize([c.name for c in all_cases], ours, peft)
    print("\n" + table(rows))
    print("\n".join(["", *targets(rows)]))
    failed = [f"{r['case']}: {r['n_errors']} failed ({r['errors'][0] if r['errors'] else 'output equals base-only'})"
              for r in rows if "applied" in r and (r["n_errors"] or not r["applied"])]
    for line in failed:
        print("FAILED", line)
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                                     "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
