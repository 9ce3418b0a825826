"""Fair scheduling on a real server: tenant `a` offers 10x tenant `b`'s load; under VTC b still
gets its fair share (within the paper's bound), under FCFS on the same workload it is starved.

Measure (client side, loadtest/fairness.py): W = w_p * prompt tokens + w_q * output tokens of the
requests a tenant got answered from the start of the run to its end (from `usage`), w_p = 1 and
w_q = 2 (the server's VTC defaults); every request has the same prompt length P and max_tokens
(ignore_eos), and each tenant keeps more requests outstanding than the whole batch holds, so
both are backlogged throughout.
Bound (Sheng et al., OSDI 2024, Theorem 4.4), equal weights:
    |W_a - W_b| <= 2U + slack,  U = max(w_p * P, w_q * M),  M = max_num_seqs * (P + max_tokens)
(M: the most tokens the running batch holds), i.e. b's service is at least its fair half of the
total minus (U + slack/2). slack = max_num_seqs * (w_p * P + w_q * max_tokens): the requests still
running at the cut, served in part but not counted.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server_process import ServerProcess  # noqa: E402

from loadtest.fairness import TenantLoad, offer, tenants_file  # noqa: E402

W_P, W_Q = 1.0, 2.0
P, MAX_TOKENS, MAX_NUM_SEQS = 16, 32, 2
M = MAX_NUM_SEQS * (P + MAX_TOKENS)
U = max(W_P * P, W_Q * M)
SLACK = MAX_NUM_SEQS * (W_P * P + W_Q * MAX_TOKENS)
BOUND = 2 * U + SLACK
LOADS = [TenantLoad("a", "sk-tenant-a-fairness", 100), TenantLoad("b", "sk-tenant-b-fairness", 10)]
TARGET = 10 * BOUND  # total service per run: long enough that FCFS's gap dwarfs the bound


def served(model_dir: Path, tmp_path: Path, scheduling: str) -> tuple[dict[str, float], dict[str, float]]:
    """(client-measured W per tenant, the server's VTC counters) for one run."""
    tfile = tenants_file(tmp_path / "tenants.toml", LOADS)
    srv = ServerProcess(["--model", str(model_dir), "--served-model-name", "tiny", "--dtype", "float32",
                         "--num-threads", "1", "--kv-cache-memory", "16MiB", "--no-lora", "--tenants", str(tfile),
                         "--scheduling", scheduling, "--max-num-seqs", str(MAX_NUM_SEQS),
                         "--max-waiting", "1000"],  # the backlog is the point here: no fast 503s
                        tmp_path / f"{scheduling}.log")
    try:
        # The counters come from one scrape (a step takes ~1 ms here: two scrapes are dozens of
        # steps apart), taken at the cut while both tenants are still backlogged (the lemma's
        # condition); after the disconnects one tenant's queue empties before the other's.
        def vtc_counters() -> dict[str, float]:
            text = srv.scrape()
            return {t.name: srv.metric("loramux_tenant_virtual_tokens", f'tenant="{t.name}"', text) for t in LOADS}

        trace = asyncio.run(offer(srv.base_url, "tiny", LOADS, prompt_len=P, max_tokens=MAX_TOKENS,
                                  max_duration_s=90, stop_at_service=TARGET, w_p=W_P, w_q=W_Q, at_cut=vtc_counters))
        counters = trace.at_cut
    finally:
        srv.stop()
    assert not trace.errors, trace.errors[:3]
    w = {t.name: trace.service(t.name, W_P, W_Q) for t in LOADS}
    assert sum(w.values()) >= TARGET, f"the run served too little to judge: {w} in {trace.duration_s:.0f}s"
    return w, counters


def backlogged(w: dict[str, float], counters: dict[str, float]) -> bool:
    """Whether each tenant's VTC counter at the cut is what it was served plus at most what was in
    flight (SLACK) and one lift's worth (U): a tenant whose queue ran dry is lifted further."""
    return all(counters[t] - w[t] <= SLACK + U for t in w)


@pytest.mark.slow  # two server starts and two ~10 s runs: about 1.5 min on the shared 2 cores
def test_vtc_gives_the_light_tenant_its_fair_share_and_fcfs_starves_it(tiny_llama_dir, tmp_path):
    vtc, counters = served(tiny_llama_dir, tmp_path, "vtc")
    if not backlogged(vtc, counters):
        # The bound holds while both tenants are backlogged. A client-side stall long enough for a
        # tenant's queue to run dry shows as a counter lifted far above what that tenant was served
        # (once under CI load: b charged 3890, served 2320); such a run cannot judge VTC: again.
        print(f"not backlogged throughout: served {vtc}, counters {counters}; measuring again")
        (tmp_path / "again").mkdir()
        vtc, counters = served(tiny_llama_dir, tmp_path / "again", "vtc")
    fcfs, fcfs_counters = served(tiny_llama_dir, tmp_path, "fcfs")
    report = f"vtc {vtc} (server counters {counters}), fcfs {fcfs}, bound {BOUND}"
    print(report)
    assert backlogged(vtc, counters), report
    assert abs(vtc["a"] - vtc["b"]) <= BOUND, report
    assert vtc["b"] >= (vtc["a"] + vtc["b"]) / 2 - BOUND / 2, report  # the same, as b's fair half
    # The server's own counters agree (the paper's lemma: backlogged tenants' counters differ by at most U).
    assert abs(counters["a"] - counters["b"]) <= U, report
    # Same workload, FCFS: b gets roughly its 1/11 of the requests, far outside the bound.
    assert fcfs["a"] - fcfs["b"] > 3 * BOUND, report
    assert fcfs["b"] / sum(fcfs.values()) < 0.5 * vtc["b"] / sum(vtc.values()), report
    assert fcfs_counters == {"a": 0.0, "b": 0.0}  # no VTC counters under fcfs
