"""Paged LoRA pools for tests: a dense slot pool of adapters (random A/B per slot, mixed ranks,
zero past each rank), the same adapters scattered into rank-unit pages (kernels/pages.py) with
every place nothing may read filled with large garbage, and the checks over them. Used by
tests/test_kernels_pages.py."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import torch

from kernels import LoraSegments

GARBAGE = 50.0


@dataclass
class Case:
    slot_rank: list  # adapter rank of every pool slot
    lens: list       # the step's segments: tokens per segment ...
    slots: list      # ... and their slots (ascending)
    u: int
    r_pad: int
    in_dim: int
    widths: list
    tail: int = 3    # base-only rows after the LoRA tokens

    @property
    def offsets(self):
        return tuple(accumulate(self.widths, initial=0))


def dense_pool(case: Case, g: torch.Generator):
    """Slot pool [N, n_s*R, in] / [N, out, R]: each slot's adapter, zero past its rank."""
    n_s, R, N = len(case.widths), case.r_pad, len(case.slot_rank)
    out_total = sum(case.widths)
    a = torch.randn(N, n_s * R, case.in_dim, generator=g) / case.in_dim ** 0.5
    b = torch.randn(N, out_total, R, generator=g)
    for s, r in enumerate(case.slot_rank):
        b[s] /= max(r, 1) ** 0.5
        a.view(N, n_s, R, -1)[s, :, r:] = 0
        b[s, :, r:] = 0
    return a, b


def paginate(a_d: torch.Tensor, b_d: torch.Tensor, slot_rank, n_s: int, u: int, g: torch.Generator,
             spare: int = 3):
    """The same adapters in a paged pool: a [P, n_s*u, in], b [P, out, u], pages [N, R//u] int32."""
    N, _, k = a_d.shape
    out, R = b_d.shape[1], b_d.shape[2]
    n_pg = R // u
    need = [math.ceil(r / u) for r in slot_rank]
    P = sum(need) + spare
    a = torch.randn(P, n_s * u, k, generator=g) * GARBAGE
    b = torch.randn(P, out, u, generator=g) * GARBAGE
    order = torch.randperm(P, generator=g).tolist()
    pages = torch.randint(0, P, (N, n_pg), generator=g, dtype=torch.int32)  # unused entries: any page
    for s, r in enumerate(slot_rank):
        for j in range(need[s]):
            p = order.pop()
            pages[s, j] = p
            a[p] = a_d[s].view(n_s, n_pg, u, k)[:, j].reshape(n_s * u, k)
            b[p] = b_d[s].view(out, n_pg, u)[:, j]
            if j == need[s] - 1 and r % u:  # rows past the rank: garbage, not the writer's zeros
                a[p].view(n_s, u, k)[:, r % u:] = GARBAGE
                b[p, :, r % u:] = -GARBAGE
    return a, b, pages


def make(case: Case, wdt, xdt, seed=0, device="cpu"):
    """(seg, x, y, dense a, dense b, paged a, paged b, pages) of a case, on `device`."""
    g = torch.Generator().manual_seed(seed)
    a_d, b_d = dense_pool(case, g)
    a_p, b_p, pages = paginate(a_d, b_d, case.slot_rank, len(case.widths), case.u, g)
    seg = LoraSegments.build(case.lens, case.slots, [case.slot_rank[s] for s in case.slots],
                             len(case.slot_rank), device)
    x = torch.randn(seg.num_tokens + case.tail, case.in_dim, generator=g)
    y = torch.randn(seg.num_tokens + case.tail, sum(case.widths), generator=g)
    cw = lambda t: t.to(device=device, dtype=wdt)  # noqa: E731
    cx = lambda t: t.to(device=device, dtype=xdt)  # noqa: E731
    return seg, cx(x), cx(y), cw(a_d), cw(b_d), cw(a_p), cw(b_p), pages.to(device)


def check_close(out, ref, y0, nt, loose):
    """Relative error of the LoRA rows; base-only rows exactly untouched."""
    assert torch.isfinite(out).all()
    assert torch.equal(out[nt:], y0[nt:]), "base-only tail rows were modified"
    assert (ref[:nt].double() - y0[:nt].double()).norm() > 0.1 * y0[:nt].double().norm(), "vacuous"
    err = (out[:nt].double() - ref[:nt].double()).norm() / ref[:nt].double().norm()
    tol = 1.5e-2 if loose else 1e-5
    assert err < tol, f"relative error {err:.3g} >= {tol}"


def past_rank(seg: LoraSegments, n_s: int, r_pad: int) -> torch.Tensor:
    """[num_tokens, n_s*R] bool: h columns past the token's segment rank."""
    lens = torch.diff(torch.tensor(seg.seg_starts))
    rank = torch.repeat_interleave(torch.tensor(seg.seg_ranks), lens)
    return (torch.arange(r_pad)[None, :] >= rank[:, None]).repeat(1, n_s)


DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16)}
