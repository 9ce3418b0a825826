"""Host side of mixtures and routing: one step's LoRA rows, built from runs of tokens.

The runner says, per chunk of tokens, which slot(s) they use (`RowPlan.add` for a single adapter
or one mixture expert, `add_routed` for Arrow routing over a library); `build` lays the rows out
by slot and uploads each table once. Cost O(rows + routed library pairs), plain Python arrays,
like LoraSegments.build.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Sequence

import torch

from .mixture import LoraRows, MixTable, RouteTable
from .upload import upload

# Routed (and mixture) tokens run dense (against every routing (mixture) expert of the step,
# kernels/mixture.py) while that is at most this many times the (token, expert) pairs they need:
# the dense path measured ~1.7x cheaper per pair than LoRA rows at decode (add_lora_dense), so it
# wins while the step's libraries (mixtures) mostly share their experts.
DENSE_SLACK = 1.5


@dataclass(frozen=True, eq=False)
class DoraTokens:
    """The step's tokens of DoRA adapters: token [T_d] int64 distinct rows, slot [T_d] int64 their slots."""

    token: torch.Tensor
    slot: torch.Tensor

    @staticmethod
    def build(tokens: Sequence[int], slots: Sequence[int], device: torch.device | str) -> "DoraTokens":
        buf = array("q", tokens)
        buf.extend(slots)
        dev = upload(buf, torch.int64, device)
        return DoraTokens(dev[: len(tokens)], dev[len(tokens):])


@dataclass(frozen=True)
class StepRows:
    """What RowPlan.build gives: the segment lists (ascending slots) over `rows`, or over the
    tokens themselves when rows is None (every non-routed token uses one adapter and the runs
    already lie in slot order); `dense`: the routed tokens' table when they run dense (their
    tokens are then in no segment), else None (routed pairs, if any, are rows: rows.route)."""

    seg_lens: list[int]
    seg_slots: list[int]
    rows: LoraRows | None
    dense: RouteTable | None
    mixed: MixTable | None = None  # the mixture tokens when they run dense (then in no segment)


def _upload(buf: array, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if not buf:
        return torch.zeros(0, dtype=dtype, device=device)
    return upload(buf, dtype, device)


class RowPlan:
    """Runs of tokens [start, start+n), each on one slot with a weight, or routed among a library."""

    def __init__(self) -> None:
        self._runs: dict[int, list[tuple[int, int, float]]] = {}  # slot -> (start, n, weight)
        self._routes: list[tuple[int, int, tuple[int, ...], int, float]] = []  # (start, n, lib, top_k, temp)
        self._mixes: list[tuple[int, int, dict[int, float]]] = []  # (start, n, slot -> weight)

    def add(self, slot: int, start: int, n: int, weight: float = 1.0) -> None:
        """Tokens [start, start+n) get weight * (the delta of the adapter in `slot`)."""
        if n > 0:
            self._runs.setdefault(int(slot), []).append((start, n, float(weight)))

    def add_mixture(self, slots: Sequence[int], weights: Sequence[float], start: int, n: int) -> None:
        """Tokens [start, start+n) get sum_i weights[i] * (the delta of the adapter in slots[i])
        (distinct slots): dense with the step's other mixtures, or as rows (`build` decides). An
        expert of weight exactly 0 adds nothing, so it takes no row, no dense column and no part
        in that choice (known here on the host: skipping it costs no device work)."""
        ws = {int(s): float(w) for s, w in zip(slots, weights) if w != 0.0}
        if n > 0 and ws:
            self._mixes.append((start, n, ws))

    def add_routed(self, slots: Sequence[int], start: int, n: int, top_k: int, temperature: float) -> None:
        """Tokens [start, start+n) are routed (Arrow) among the adapters in `slots` (repeats
        collapse; top_k is clamped to the library's size)."""
        lib = tuple(sorted({int(s) for s in slots}))
        if n > 0 and lib:
            self._routes.append((start, n, lib, max(1, min(int(top_k), len(lib))), float(temperature)))

    def build(self, device: torch.device | str, dense_slack: float = DENSE_SLACK) -> StepRows:
        """Lay out and upload the step's tables (one int64 and one float32 upload)."""
        t0s, n_routed = [], 0
        for _, n, *_ in self._routes:
            t0s.append(n_routed)
            n_routed += n
        experts = sorted({s for _, _, lib, _, _ in self._routes for s in lib})
        u_of = {s: u for u, s in enumerate(experts)}
        n_u = len(experts)
        n_pairs = sum(n * len(lib) for _, n, lib, _, _ in self._routes)
        dense = bool(self._routes) and n_routed * n_u <= dense_slack * n_pairs
        mix_experts = sorted({s for _, _, ws in self._mixes for s in ws})
        n_mixed = sum(n for _, n, _ in self._mixes)
        mix_dense = bool(self._mixes) and n_mixed * len(mix_experts) <= dense_slack * sum(
            n * len(ws) for _, n, ws in self._mixes)

        runs = {s: [(start, n, w, -1) for start, n, w in r] for s, r in self._runs.items()}
        if not mix_dense:
            for start, n, ws in self._mixes:
                for s, w in ws.items():
                    runs.setdefault(s, []).append((start, n, w, -1))
        if not dense:
            for rid, (start, n, lib, _, _) in enumerate(self._routes):
                for s in lib:
                    runs.setdefault(s, []).append((start, n, 0.0, rid))
        seg_lens, seg_slots = [], []
        ints, floats = array("q"), array("f")
        route_rows, pairs = array("q"), array("q")
        for slot in sorted(runs):
            total = 0
            for start, n, w, rid in runs[slot]:
                if rid >= 0:
                    u, t0 = u_of[slot], t0s[rid]
                    route_rows.extend(range(len(ints), len(ints) + n))
                    pairs.extend(range(t0 * n_u + u, (t0 + n) * n_u + u, n_u))
                ints.extend(range(start, start + n))
                floats.extend([w] * n)
                total += n
            seg_slots.append(slot)
            seg_lens.append(total)
        n_rows = len(ints)
        # rows that are the tokens 1:1 in order with weight 1 need no rows table (add_lora's path)
        identity = not route_rows and all(w == 1.0 for w in floats) and ints == array("q", range(n_rows))
        if identity:
            del ints[:], floats[:]
        at_route = len(ints)
        k_max = max((k for _, _, _, k, _ in self._routes), default=0)
        if self._routes:
            allowed = bytearray(n_routed * n_u)
            top_k, temps, rank_ok = array("q"), array("f"), array("q")
            for (start, n, lib, k, temp), t0 in zip(self._routes, t0s):
                ints.extend(range(start, start + n))
                top_k.extend([k] * n)
                temps.extend([temp] * n)
                rank_ok.extend(([1] * k + [0] * (k_max - k)) * n)
                us = [u_of[s] for s in lib]
                for t in range(t0, t0 + n):
                    for u in us:
                        allowed[t * n_u + u] = 1
            for part in (experts, allowed, top_k, rank_ok, route_rows, pairs):
                ints.extend(part)
            floats.extend(temps)
        at_mix, at_mix_w = len(ints), len(floats)
        if mix_dense:
            u_m = {s: u for u, s in enumerate(mix_experts)}
            weights = array("f", bytes(4 * n_mixed * len(mix_experts)))
            t = 0
            for start, n, ws in self._mixes:
                ints.extend(range(start, start + n))
                for _ in range(n):
                    for s, w in ws.items():
                        weights[t * len(mix_experts) + u_m[s]] = w
                    t += 1
            ints.extend(mix_experts)
            floats.extend(weights)
        idev, fdev = _upload(ints, torch.int64, device), _upload(floats, torch.float32, device)
        mixed = None
        if mix_dense:
            n_m = len(mix_experts)
            mixed = MixTable(tokens=idev[at_mix:at_mix + n_mixed], experts=idev[at_mix + n_mixed:at_mix + n_mixed + n_m],
                             weight=fdev[at_mix_w:at_mix_w + n_mixed * n_m].view(n_mixed, n_m, 1))
        route = None
        if self._routes:
            views, at = [], at_route
            for size in (n_routed, n_u, n_routed * n_u, n_routed, n_routed * k_max, len(route_rows), len(pairs)):
                views.append(idev[at: at + size])
                at += size
            route = RouteTable(
                tokens=views[0], experts=views[1], allowed=views[2].view(n_routed, n_u).bool(),
                top_k=views[3].view(n_routed, 1), temperature=fdev[at_route:at_route + n_routed].view(n_routed, 1),
                k_max=k_max, rank_ok=views[4].view(n_routed, k_max, 1).bool(),
                rows=None if dense else views[5], pairs=None if dense else views[6])
        rows = None if identity else LoraRows(token=idev[:n_rows], weight=fdev[:n_rows].view(n_rows, 1),
                                              route=None if dense else route)
        return StepRows(seg_lens, seg_slots, rows, route if dense else None, mixed)
