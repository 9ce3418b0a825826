"""Next-token selection for one step: penalties, temperature, top-k/top-p/min-p, seeded
sampling and logprobs, each row with its own parameters.

Sampling uses the exponential race (`argmax(p / E)`, `E ~ Exp(1)`), which draws exactly
from `p`; a seeded request draws `E` from its own generator, so its tokens do not depend
on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.upload import to_device
from server.engine.request import SamplingParams, Sequence

if TYPE_CHECKING:
    from server.engine.model_runner import Pending


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class SamplerOutput:
    token_ids: list[int]  # NON_FINITE for a row whose logits were not finite numbers
    logprobs: list[TokenLogprobs | None]  # None for such a row


# A row's token when its logits held a NaN or +inf, or nothing finite to choose from after
# penalties, temperature and top-k/p: a numeric blow-up (e.g. huge mixture weights), which no
# token may hide. Only the host sees it: the device keeps the row's argmax, a valid id, for
# a step launched before the host has read it (async scheduling) to embed.
NON_FINITE = -1


class SampledStep:
    """One step's sampled tokens: on the device at once (`tokens`, [B] int64, always valid ids:
    the next step may read them there before the host has them), on the host from `output()`,
    where a row whose logits were not finite reads NON_FINITE (`finite` [B] bool on the device
    marks them). On a GPU the copy to pinned host memory is queued behind the step, so nothing
    waits until `output()`."""

    def __init__(self, tokens: torch.Tensor, finite: torch.Tensor, logprob_rows: list[int], logprob_ks: list[int],
                 chosen: torch.Tensor | None, top_vals: torch.Tensor | None, top_ids: torch.Tensor | None):
        self.tokens = tokens
        self._rows, self._ks = logprob_rows, logprob_ks
        marked = tokens.masked_fill(~finite, NON_FINITE)  # the flag rides on the copy the host reads anyway
        host = _to_host([t for t in (marked, chosen, top_vals, top_ids) if t is not None])
        self._host, self._ready = host
        self._output: SamplerOutput | None = None

    def output(self) -> SamplerOutput:
        """The tokens and logprobs as host values (waits for the step on a GPU; once)."""
        if self._output is None:
            if self._ready is not None:
                self._ready.synchronize()
            token_list = self._host[0].tolist()
            logprobs: list[TokenLogprobs | None] = [None] * len(token_list)
            if self._rows:
                chosen, vals, ids = (t.tolist() for t in self._host[1:])
                for i, (r, n) in enumerate(zip(self._rows, self._ks)):
                    if token_list[r] != NON_FINITE:
                        logprobs[r] = TokenLogprobs(token_list[r], chosen[i], list(zip(ids[i][:n], vals[i][:n])))
            self._output = SamplerOutput(token_list, logprobs)
        return self._output


def _to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Device tensors -> their host copies, queued into pinned memory on a GPU, and the event
    after the copies (None off CUDA: the tensors are on the host already)."""
    if not tensors or tensors[0].device.type != "cuda":
        return tensors, None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], pending: Pending | None = None) -> SampledStep:
        """logits [B, V] float32, one row per sequence (in `seqs` order) -> B next tokens. Queues
        the work and the copy back; reads nothing from the device. `pending`: the rows whose
        sequence's last token is still on the device (penalties count it there)."""
        params = [s.params for s in seqs]
        rows = [r for r, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if rows else None

        if any(p.has_penalties for p in params):
            logits = logits.clone()
            self._apply_penalties(logits, seqs, pending)

        greedy = [p.greedy for p in params]
        if all(greedy):
            # max, not argmax: the same pass also gives the peak, NaN if the row holds one
            peak, tokens = logits.max(dim=-1)
        else:
            tokens, peak = self._sample_random(logits, seqs, greedy)
        finite = peak.isfinite()  # NaN anywhere, +inf, or every logit -inf: not a distribution
        if raw_logprobs is None:
            return SampledStep(tokens, finite, [], [], None, None, None)
        ks = [params[r].logprobs for r in rows]
        return SampledStep(tokens, finite, rows, ks, *self._logprobs(raw_logprobs, tokens, rows, max(ks)))

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, rows: list[int], k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For `rows`, all at once: the chosen token's logprob [R] and the top-k values and ids
        [R, k]. raw [B, V] log-softmax, tokens [B] (device)."""
        idx = _rows(rows, torch.int64, self.device)
        sub = raw.index_select(0, idx)
        chosen = sub.gather(1, tokens.index_select(0, idx)[:, None]).squeeze(1)
        vals, ids = sub.topk(k, dim=-1) if k > 0 else (sub[:, :0], sub[:, :0].long())
        return chosen, vals, ids

    # --- penalties ---------------------------------------------------------------------
    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], pending: Pending | None) -> None:
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        V = logits.shape[1]
        out_counts = self._counts([seqs[i].output_token_ids for i in rows], V)
        all_counts = self._counts([seqs[i].token_ids for i in rows], V)
        idx = _rows(rows, torch.int64, self.device)
        if pending is not None:  # an output token the host does not have yet: count it on the device
            last = pending.last_tokens(len(seqs)).index_select(0, idx)[:, None]
            known = (last >= 0).to(torch.float32)
            for counts in (out_counts, all_counts):
                counts.scatter_add_(1, last.clamp(min=0), known)
        all_seen = all_counts > 0
        sub = logits[idx]
        rep = _rows([seqs[i].params.repetition_penalty for i in rows], torch.float32, self.device)[:, None]
        freq = _rows([seqs[i].params.frequency_penalty for i in rows], torch.float32, self.device)[:, None]
        pres = _rows([seqs[i].params.presence_penalty for i in rows], torch.float32, self.device)[:, None]
        # HF repetition penalty: shrink seen tokens' logits towards zero.
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(all_seen, penalized, sub)
        sub = sub - freq * out_counts - pres * (out_counts > 0)
        logits[idx] = sub

    def _counts(self, token_lists: list[list[int]], vocab: int) -> torch.Tensor:
        """[rows, V] float32 occurrence counts (padding goes to a spare column, dropped)."""
        width = max((len(t) for t in token_lists), default=0)
        padded = torch.full((len(token_lists), max(width, 1)), vocab, dtype=torch.int64)
        for r, toks in enumerate(token_lists):
            if toks:
                padded[r, : len(toks)] = torch.tensor(toks, dtype=torch.int64)
        counts = torch.zeros(len(token_lists), vocab + 1, device=self.device)
        counts.scatter_add_(1, to_device(padded, self.device), torch.ones_like(padded, dtype=torch.float32,
                                                                     device=self.device))
        return counts[:, :vocab]

    # --- random sampling -----------------------------------------------------------------
    def _sample_random(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens [B] and each row's peak [B]: its largest logit after temperature and top-k/p
        (NaN if the row holds one)."""
        params = [s.params for s in seqs]
        temps = _rows([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32,
                      self.device)[:, None]
        scaled = logits / temps
        if any(p.top_k > 0 for p in params):
            scaled = _top_k(scaled, [p.top_k if p.top_k > 0 else 0 for p in params])
        if any(p.top_p < 1.0 for p in params):
            scaled = _top_p(scaled, [p.top_p for p in params])
        peak = scaled.amax(dim=-1)
        probs = torch.softmax(scaled, dim=-1)
        if any(p.min_p > 0 for p in params):
            mins = _rows([p.min_p for p in params], torch.float32, self.device)[:, None]
            probs = probs.masked_fill(probs < mins * probs.max(dim=-1, keepdim=True).values, 0.0)

        # Every seeded row's generator first: one that cannot be made fails the step before any
        # row has drawn, so the rows rerun without it draw what they would have drawn alone.
        seeded = [(row, self._rng(seq)) for row, seq in enumerate(seqs)
                  if params[row].seed is not None and not greedy[row]]
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self._generator)
        for row, rng in seeded:
            noise[row].exponential_(generator=rng)
        sampled = (probs / noise).argmax(dim=-1)
        if not any(greedy):
            return sampled, peak
        greedy_rows = _rows(greedy, torch.bool, self.device)
        return torch.where(greedy_rows, logits.argmax(dim=-1), sampled), peak

    def _rng(self, seq: Sequence) -> torch.Generator:
        if seq.rng is None:
            rng = torch.Generator(device=self.device)
            rng.manual_seed(seq.params.seed)  # may raise: then no half-made generator is kept
            seq.rng = rng
        return seq.rng


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    V = logits.shape[1]
    k_max = min(max(ks), V)
    kth = logits.topk(k_max, dim=-1).values  # [B, k_max], descending
    k = _rows([min(k, V) if k > 0 else k_max for k in ks], torch.int64, logits.device)
    threshold = kth.gather(1, (k - 1)[:, None])
    off = _rows([k <= 0 for k in ks], torch.bool, logits.device)[:, None]
    return logits.masked_fill((logits < threshold) & ~off, float("-inf"))


def _top_p(logits: torch.Tensor, ps: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches p (always at least the top token).
    mass_before = probs.cumsum(dim=-1) - probs
    p = _rows([p if p < 1.0 else 2.0 for p in ps], torch.float32, logits.device)[:, None]  # 1.0: keep all
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False  # the top token's mass before is 0, and a p under float32's range is 0 too
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _rows(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-row host values on the device without waiting for the step still queued there."""
    return to_device(torch.tensor(values, dtype=dtype), device)


__all__ = ["NON_FINITE", "SampledStep", "Sampler", "SamplerOutput", "TokenLogprobs", "SamplingParams"]
