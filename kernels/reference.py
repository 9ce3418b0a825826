"""Slow, obvious per-segment torch loops: the oracle the fast paths are tested against.

Semantics the fast paths must match (the mixture/routing/DoRA oracles at the end follow
kernels/mixture.py's docstring, one token at a time):
  * only rows [0, num_tokens) of y are touched; h has exactly num_tokens rows;
  * segment i uses pool row seg_slots[i] and only its first seg_ranks[i] rank columns of
    every slice; h columns at padded ranks are exactly 0;
  * math in float32 on float32 copies of the operands, except that expand rounds h to the
    dtype of b first, as the fast paths feed the matrix units in the weights' dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .segments import LoraSegments

if TYPE_CHECKING:
    from .mixture import LoraRows, MixTable, RouteTable


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments,
                    n_slices: int | None = None) -> torch.Tensor:
    """x [T, in], a [N, n_slices*R, in] -> h [num_tokens, n_slices*R] float32.

    Without n_slices the padded rank R is unknown, so every row of a is used (equal to the
    rank-limited result when the padding is zero, as the pool contract requires).
    """
    nr = a.shape[1]
    skip_pad = n_slices is not None
    n_slices = n_slices or 1
    r_pad = nr // n_slices
    h = torch.zeros(seg.num_tokens, nr, dtype=torch.float32, device=x.device)
    for i in range(seg.num_segments):
        s, e = seg.seg_starts[i], seg.seg_starts[i + 1]
        slot = seg.seg_slots[i]
        rank = min(seg.seg_ranks[i], r_pad) if skip_pad else r_pad
        xs = x[s:e].float()
        for j in range(n_slices):
            w = a[slot, j * r_pad: j * r_pad + rank].float()  # [rank, in]
            h[s:e, j * r_pad: j * r_pad + rank] = xs @ w.T
    return h


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
                    slice_offsets: Sequence[int]) -> None:
    """In place y[:num_tokens, off[j]:off[j+1]] += h[:, j*R:j*R+rank] @ b[slot, off[j]:off[j+1], :rank]^T."""
    n_slices = len(slice_offsets) - 1
    r_pad = b.shape[2]
    for i in range(seg.num_segments):
        s, e = seg.seg_starts[i], seg.seg_starts[i + 1]
        slot, rank = seg.seg_slots[i], seg.seg_ranks[i]
        for j in range(n_slices):
            lo, hi = slice_offsets[j], slice_offsets[j + 1]
            hs = h[s:e, j * r_pad: j * r_pad + rank].to(b.dtype).float()
            w = b[slot, lo:hi, :rank].float()  # [width, rank]
            y[s:e, lo:hi] = (y[s:e, lo:hi].float() + hs @ w.T).to(y.dtype)


def add_lora_ref(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 seg: LoraSegments, slice_offsets: Sequence[int]) -> None:
    """y += shrink then expand, per segment (see module docstring)."""
    n_slices = len(slice_offsets) - 1
    h = lora_shrink_ref(x, a, seg, n_slices)
    lora_expand_ref(y, h, b, seg, slice_offsets)


def add_lora_dense(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   seg: LoraSegments, slice_offsets: Sequence[int]) -> None:
    """Independent formulation, used only to check the oracle: gather each token's weights,
    mask padded ranks, and contract with one float64 einsum (no segment loop)."""
    n_slices = len(slice_offsets) - 1
    r_pad = b.shape[2]
    nt = seg.num_tokens
    if nt == 0:
        return
    lens = torch.diff(torch.tensor(seg.seg_starts))
    tok_slot = torch.repeat_interleave(torch.tensor(seg.seg_slots), lens).to(x.device)
    tok_rank = torch.repeat_interleave(torch.tensor(seg.seg_ranks), lens).to(x.device)
    keep = (torch.arange(r_pad, device=x.device)[None, :] < tok_rank[:, None]).double()  # [nt, R]
    ag = a[tok_slot].double().view(nt, n_slices, r_pad, -1) * keep[:, None, :, None]
    h = torch.einsum("tk,tsrk->tsr", x[:nt].double(), ag)  # [nt, n_slices, R]
    h = h.to(torch.float32).to(b.dtype).double()
    bg = b[tok_slot].double() * keep[:, None, :]  # [nt, out_total, R]
    for j in range(n_slices):
        lo, hi = slice_offsets[j], slice_offsets[j + 1]
        d = torch.einsum("tr,tor->to", h[:, j], bg[:, lo:hi])
        y[:nt, lo:hi] = (y[:nt, lo:hi].double() + d).to(y.dtype)


def arrow_weights_ref(x: torch.Tensor, protos: torch.Tensor, proto_valid: torch.Tensor,
                      route: "RouteTable") -> torch.Tensor:
    """Per routed token and slice: sort the valid library experts by |x . proto| (float32), keep
    the token's top_k, softmax(kept / temperature). -> [T_r, U, n_slices] float32."""
    tokens, experts = route.tokens.tolist(), route.experts.tolist()
    allowed, valid = route.allowed.tolist(), proto_valid.tolist()
    top_k, temps = route.top_k.view(-1).tolist(), route.temperature.view(-1).tolist()
    n_s = protos.shape[1]
    w = torch.zeros(len(tokens), len(experts), n_s)
    for t, tok in enumerate(tokens):
        xt = x[tok].float()
        for j in range(n_s):
            cands = sorted(((abs(float(xt @ protos[e, j].float())), u) for u, e in enumerate(experts)
                            if allowed[t][u] and valid[e][j]), reverse=True)[: top_k[t]]
            if cands:
                soft = torch.softmax(torch.tensor([v for v, _ in cands]) / temps[t], dim=0)
                for (_, u), p in zip(cands, soft.tolist()):
                    w[t, u, j] = p
    return w


def add_lora_rows_ref(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
                      slice_offsets: Sequence[int], rows: "LoraRows", protos: torch.Tensor | None = None,
                      proto_valid: torch.Tensor | None = None) -> None:
    """One row at a time: y[token] += weight_j * B_j A_j x[token] for each slice j, summed per
    token in float32 (h rounded to b's dtype before expand, as the fast paths)."""
    n_slices = len(slice_offsets) - 1
    r_pad = b.shape[2]
    tokens, weights = rows.token.tolist(), rows.weight.view(-1).tolist()
    per_slice = [[w] * n_slices for w in weights]
    if rows.route is not None:
        aw = arrow_weights_ref(x, protos, proto_valid, rows.route)
        n_u = aw.shape[1]
        for r, p in zip(rows.route.rows.tolist(), rows.route.pairs.tolist()):
            per_slice[r] = aw[p // n_u, p % n_u].tolist()
    acc: dict[int, torch.Tensor] = {}
    for i in range(seg.num_segments):
        slot, rank = seg.seg_slots[i], seg.seg_ranks[i]
        for r in range(seg.seg_starts[i], seg.seg_starts[i + 1]):
            t = tokens[r]
            d = acc.setdefault(t, torch.zeros(y.shape[1]))
            for j in range(n_slices):
                lo, hi = slice_offsets[j], slice_offsets[j + 1]
                h = (a[slot, j * r_pad: j * r_pad + rank].float() @ x[t].float()) * per_slice[r][j]
                d[lo:hi] += b[slot, lo:hi, :rank].float() @ h.to(b.dtype).float()
    for t, d in acc.items():
        y[t] = (y[t].float() + d).to(y.dtype)


def add_lora_routed_ref(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        slice_offsets: Sequence[int], route: "RouteTable", protos: torch.Tensor,
                        proto_valid: torch.Tensor) -> None:
    """Dense-mode routing, one routed token and expert at a time: y[t] += sum_u w[t,u,j] B_u,j A_u,j x[t]
    (every rank row: the pool is zero past each adapter's rank), float32, h rounded to b's dtype."""
    n_slices = len(slice_offsets) - 1
    r_pad = b.shape[2]
    aw = arrow_weights_ref(x, protos, proto_valid, route)
    for i, t in enumerate(route.tokens.tolist()):
        d = torch.zeros(y.shape[1])
        for u, slot in enumerate(route.experts.tolist()):
            for j in range(n_slices):
                lo, hi = slice_offsets[j], slice_offsets[j + 1]
                h = (a[slot, j * r_pad:(j + 1) * r_pad].float() @ x[t].float()) * float(aw[i, u, j])
                d[lo:hi] += b[slot, lo:hi].float() @ h.to(b.dtype).float()
        y[t] = (y[t].float() + d).to(y.dtype)


def add_lora_mixed_ref(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       slice_offsets: Sequence[int], mix: "MixTable") -> None:
    """Dense-mode mixtures, one token and expert at a time: y[t] += sum_u w[t,u] B_u A_u x[t]
    (every rank row: the pool is zero past each adapter's rank), float32, h rounded to b's dtype."""
    r_pad = b.shape[2]
    for i, t in enumerate(mix.tokens.tolist()):
        d = torch.zeros(y.shape[1])
        for u, slot in enumerate(mix.experts.tolist()):
            for j in range(len(slice_offsets) - 1):
                lo, hi = slice_offsets[j], slice_offsets[j + 1]
                h = (a[slot, j * r_pad:(j + 1) * r_pad].float() @ x[t].float()) * float(mix.weight[i, u, 0])
                d[lo:hi] += b[slot, lo:hi].float() @ h.to(b.dtype).float()
        y[t] = (y[t].float() + d).to(y.dtype)


def dora_rescale_ref(y: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                     tokens: torch.Tensor, slots: torch.Tensor) -> None:
    """One DoRA token at a time: y[t] = g * y[t] + (1 - g) * bias (float32), g = scale[slot]."""
    for t, s in zip(tokens.tolist(), slots.tolist()):
        g = scale[s].float()
        b = bias.float() if bias is not None else torch.zeros_like(g)
        y[t] = (g * y[t].float() + (1 - g) * b).to(y.dtype)
