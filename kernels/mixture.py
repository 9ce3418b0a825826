"""LoRA over rows: weighted adapter mixtures, Arrow per-token routing, and the DoRA rescale.

A step whose tokens each use one adapter runs add_lora over its tokens (kernels/lora.py). Once
some token mixes adapters, the step's LoRA work is laid out as *rows* instead: one row per
(token, adapter) pair, sorted by pool slot, so the segment table is built over rows and the
segmented shrink/expand kernels (every backend) run unchanged on the gathered x rows. Each row
carries a weight: 1 for a single adapter, w_i for mixture expert i.

Routed (Arrow) tokens run one of two ways, chosen per step on the host (kernels/row_plan.py):
  dense  (libraries overlap: the usual case) the routed tokens against all U routing experts at
         once: one GEMM x @ [A_1; ...; A_U]^T, the Arrow weights applied to h, one GEMM per slice
         h @ [B_1 ... B_U]^T (K = U*R): PEFT's formulation, and the fastest on CPU at decode
         (see the benchmark note in add_lora_routed);
  rows   (libraries mostly disjoint, so U is much larger than a token's library) one LoRA row
         per (token, library expert) pair, weighted per layer by its Arrow weight.
Mixture tokens are chosen the same way: dense (MixTable: the step's mixtures share experts) with
their fixed weights, or one row per (token, expert).

Semantics (PEFT's; see the issue-12 design):
  mixture  delta(x) = sum_i w_i * B_i A_i x            (B pre-scaled by each expert's own s_i)
  Arrow    per slice j: logit[t, u] = |x_t . proto[u, j]| over the token's library (experts that
           do not target slice j: -inf); keep its top_k, softmax(kept / temperature), others 0;
           delta_j(x_t) = sum_u weight[t, u, j] * B_u,j A_u,j x_t. No valid expert: weight 0.
  DoRA     y = g * y + (1 - g) * bias for the DoRA tokens, g = m / ||W + s B A||_row per output.
Every op here is a fixed sequence of tensor ops: no loop over tokens or adapters, no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .lora import lora_expand, lora_shrink
from .pages import rank_keep, slot_a, slots_b_flat
from .segments import LoraSegments


@dataclass(frozen=True, eq=False)  # identity semantics: fields are tensors
class RouteTable:
    """Arrow routing of a step's routed tokens over U = the union of their experts (ascending slots).

    tokens       [T_r] int64   token row (flat batch) of each routed token
    experts      [U] int64     pool slot of each routing expert, ascending
    allowed      [T_r, U] bool expert u is in token t's library
    top_k        [T_r, 1] int64   experts kept per token (1 <= top_k <= U)
    temperature  [T_r, 1] float32 softmax temperature per token (> 0)
    k_max        host int: max(top_k), the width of the one topk call
    rank_ok      [T_r, k_max, 1] bool  rank r < top_k of the token (its kept topk positions)
    rows mode only (None in dense mode):
    rows         [P] int64     LoRA row of each (t, u) library pair
    pairs        [P] int64     t * U + u of that pair
    """

    tokens: torch.Tensor
    experts: torch.Tensor
    allowed: torch.Tensor
    top_k: torch.Tensor
    temperature: torch.Tensor
    k_max: int
    rank_ok: torch.Tensor
    rows: torch.Tensor | None = None
    pairs: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class LoraRows:
    """LoRA rows when they are not the step's tokens 1:1 (mixtures, routing).

    token   [n_rows] int64      token row each LoRA row reads x from and adds its delta into
    weight  [n_rows, 1] float32 1 (single adapter), w_i (mixture expert), 0 (routed: set per layer)
    route   the routing of the routed rows (rows mode), or None
    Rows are in the order of the segment table built over them (ascending slot).
    """

    token: torch.Tensor
    weight: torch.Tensor
    route: RouteTable | None

    @property
    def num_rows(self) -> int:
        return self.token.shape[0]


def arrow_weights(x: torch.Tensor, protos: torch.Tensor, proto_valid: torch.Tensor,
                  route: RouteTable) -> torch.Tensor:
    """Arrow routing weights of the routed tokens at one layer/group.

    x [T, in] (the layer input of the whole batch), protos [N, n_slices, in] (each slot's unit
    prototype per fused slice), proto_valid [N, n_slices] bool (the slot's adapter targets that
    slice) -> weight [T_r, U, n_slices] float32: per (token, slice) a softmax over the token's
    top_k library experts by |x . proto| / temperature, 0 elsewhere; all 0 where none is valid.
    Logits are computed in float32.
    """
    n_t, n_u = route.allowed.shape
    p = protos.index_select(0, route.experts)  # [U, n_s, in]
    n_s = p.shape[1]
    xr = x.index_select(0, route.tokens).float()
    logits = (xr @ p.reshape(n_u * n_s, -1).float().T).abs_().view(n_t, n_u, n_s)
    valid = route.allowed.unsqueeze(2) & proto_valid.index_select(0, route.experts).unsqueeze(0)
    logits.masked_fill_(~valid, -1.0)  # |x . proto| >= 0, so -1 marks experts taking no part
    vals, idx = logits.topk(route.k_max, dim=1)  # [T_r, k_max, n_s]
    keep = (vals >= 0) & route.rank_ok  # a valid expert within the token's own top_k
    drop = ~keep
    # shifted by the top score before dividing: (v - max) / temperature <= 0, so a tiny
    # temperature gives -inf for the others (weight 0), never inf - inf (NaN) in the softmax
    z = (vals - vals[:, :1]).div_(route.temperature.unsqueeze(2)).masked_fill_(drop, float("-inf"))
    # a (token, slice) with nothing kept softmaxes to NaN; the last fill makes it all 0
    soft = torch.softmax(z, dim=1).masked_fill_(drop, 0.0)
    return torch.zeros_like(logits).scatter_(1, idx, soft)


def row_weights(rows: LoraRows, x: torch.Tensor, n_slices: int, protos: torch.Tensor | None = None,
                proto_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's weight per slice: [n_rows, 1] (no routing) or [n_rows, n_slices] float32."""
    if rows.route is None:
        return rows.weight
    if protos is None or proto_valid is None:
        raise ValueError("routed rows need the layer's prototypes and their validity")
    r = rows.route
    if r.rows is None:
        raise ValueError("a dense-mode RouteTable has no rows: run it with add_lora_routed")
    aw = arrow_weights(x, protos, proto_valid, r).view(-1, n_slices)  # [(T_r*U), n_s]
    w = rows.weight.expand(rows.num_rows, n_slices).contiguous()
    return w.index_copy_(0, r.rows, aw.index_select(0, r.pairs))


def add_lora_rows(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
                  slice_offsets: Sequence[int], rows: LoraRows, protos: torch.Tensor | None = None,
                  proto_valid: torch.Tensor | None = None, backend: str | None = None,
                  pages: torch.Tensor | None = None) -> None:
    """y[token] += sum over its rows of weight * (B A x[token]), per fused slice. In place.

    y [T, out_total] and x [T, in] (fp32/bf16), a [N, n_slices*R, in], b [N, out_total, R] (B
    pre-scaled), or a paged pool a [P, n_slices*u, in], b [P, out_total, u] with pages [N, R//u]
    (kernels/pages.py), seg: the segment table over rows (num_tokens == rows.num_rows), rows:
    LoraRows. protos [N, n_slices, in] / proto_valid [N, n_slices]: this layer/group's
    prototypes, needed only when rows.route is set. Rows' deltas are summed in float32 and
    added to y once.
    """
    if seg.num_tokens == 0:
        return
    if seg.num_tokens != rows.num_rows:
        raise ValueError(f"segment table over {seg.num_tokens} rows, LoraRows has {rows.num_rows}")
    n_slices = len(slice_offsets) - 1
    n = rows.num_rows
    xr = x.index_select(0, rows.token)
    h = lora_shrink(xr, a, seg, n_slices=n_slices, backend=backend, pages=pages)  # [n_rows, n_s*R] float32
    w = row_weights(rows, x, n_slices, protos, proto_valid)
    h.view(n, n_slices, -1).mul_(w.unsqueeze(2))
    delta = torch.zeros(n, y.shape[1], dtype=torch.float32, device=y.device)
    lora_expand(delta, h, b, seg, slice_offsets, backend=backend, pages=pages)
    if y.dtype == torch.float32:
        y.index_add_(0, rows.token, delta)
    else:  # sum a token's rows in float32, then one rounding into y
        acc = torch.zeros(y.shape, dtype=torch.float32, device=y.device).index_add_(0, rows.token, delta)
        y += acc.to(y.dtype)


@dataclass(frozen=True, eq=False)
class MixTable:
    """Weighted mixtures run dense: every mixture token against all U experts of the step's
    mixtures at once (the usual case: the step's mixtures share their experts).

    tokens   [T_m] int64       token rows (flat batch) of the mixture tokens, distinct
    experts  [U] int64         pool slots of the mixtures' experts, ascending
    weight   [T_m, U, 1] float32  the token's weight of expert u (0: not in its mixture)
    """

    tokens: torch.Tensor
    experts: torch.Tensor
    weight: torch.Tensor


def add_lora_dense(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   slice_offsets: Sequence[int], tokens: torch.Tensor, experts: torch.Tensor,
                   weight: torch.Tensor, pages: torch.Tensor | None = None,
                   slot_ranks: torch.Tensor | None = None) -> None:
    """In place: y[t] += sum_u weight[t, u, j] * B_u,j A_u,j x[t] per slice j, for the tokens t
    (distinct rows) against all U `experts` at once.

    y [T, out_total], x [T, in] (fp32/bf16), a [N, n_slices*R, in], b [N, out_total, R] (B
    pre-scaled; zero past each adapter's rank), tokens [T_d] int64, experts [U] int64 slots,
    weight [T_d, U, n_slices or 1] float32. Paged pool (kernels/pages.py): a [P, n_slices*u, in],
    b [P, out_total, u], pages [N, R//u] int32, and slot_ranks [N] int (each slot's adapter
    rank, on the device): rank rows past it are masked, as the pages there name any page.
    Two GEMMs per slice group, K = U*R for the expand:
    U x the MACs of one adapter per token, but at decode on CPU (SmolLM2-135M shapes, 32 tokens,
    top-3 of 8) it measured ~1.7x faster than the same work as 8 LoRA rows per token.
    """
    n_t = tokens.shape[0]
    if n_t == 0:
        return
    n_u = experts.shape[0]
    n_s = len(slice_offsets) - 1
    w = weight.unsqueeze(3)
    if pages is None:
        r_pad = b.shape[2]
    else:
        if slot_ranks is None:
            raise ValueError("paged weights run dense need slot_ranks (each slot's adapter rank)")
        r_pad = b.shape[2] * pages.shape[1]
        w = w * rank_keep(slot_ranks, experts, r_pad)[None, :, None, :]  # [T_d, U, n_s|1, R]
    a_u = slot_a(a, experts, pages, n_s)  # [U, n_s*R, in]
    xr = x.index_select(0, tokens)
    xr = xr if xr.dtype == a.dtype else xr.to(a.dtype)
    h = (xr @ a_u.view(n_u * n_s * r_pad, -1).T).float().view(n_t, n_u, n_s, r_pad)
    h = h.mul_(w).to(b.dtype)
    # [out_total, U*R]: gathered, then moved in R-long blocks (measured faster than transposing B)
    b_u = slots_b_flat(b, experts, pages)
    delta = torch.empty(n_t, b.shape[1], dtype=b.dtype, device=y.device)
    for j in range(n_s):  # static: at most 3 fused slices
        lo, hi = slice_offsets[j], slice_offsets[j + 1]
        delta[:, lo:hi] = h[:, :, j].reshape(n_t, n_u * r_pad) @ b_u[lo:hi].T
    y.index_add_(0, tokens, delta if delta.dtype == y.dtype else delta.to(y.dtype))


def add_lora_routed(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    slice_offsets: Sequence[int], route: RouteTable, protos: torch.Tensor,
                    proto_valid: torch.Tensor, pages: torch.Tensor | None = None,
                    slot_ranks: torch.Tensor | None = None) -> None:
    """Dense Arrow, in place: the routed tokens of `route` against all its U experts at once,
    weighted by arrow_weights (see add_lora_dense, also for pages / slot_ranks).
    protos [N, n_slices, in], proto_valid [N, n_slices] bool."""
    if route.tokens.shape[0]:
        add_lora_dense(y, x, a, b, slice_offsets, route.tokens, route.experts,
                       arrow_weights(x, protos, proto_valid, route), pages, slot_ranks)


def add_lora_mixed(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   slice_offsets: Sequence[int], mix: MixTable, pages: torch.Tensor | None = None,
                   slot_ranks: torch.Tensor | None = None) -> None:
    """Dense mixtures, in place: y[t] += sum_u w[t, u] * B_u A_u x[t] (see add_lora_dense, also
    for pages / slot_ranks)."""
    add_lora_dense(y, x, a, b, slice_offsets, mix.tokens, mix.experts, mix.weight, pages, slot_ranks)


def dora_rescale(y: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, tokens: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """In place, for the DoRA tokens: y[t] = g * y[t] + (1 - g) * bias, g = scale[slot of t].

    tokens [T_d] int64 (distinct token rows), slots [T_d] int64 (their adapters' pool slots),
    y [T, out_total] (after the base linear with its bias and the LoRA add), bias [out_total] or
    None (then y[t] *= g), scale [N, out_total] float32 (1.0 where the slot is not DoRA or its
    adapter does not target that output). Math in float32, one rounding into y.
    """
    if tokens.numel() == 0:
        return
    g = scale.index_select(0, slots)
    yt = y.index_select(0, tokens).float().mul_(g)
    if bias is not None:
        yt += (1.0 - g) * bias.float()
    y.index_copy_(0, tokens, yt.to(y.dtype))
