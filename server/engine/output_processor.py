"""Turns sampled tokens into what clients see: text deltas, stop conditions, finish reasons.

Runs on the engine thread right after each step, because a stop string must stop the
sequence (and free its KV blocks) before the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.request import FinishReason, Sequence
from server.engine.sampler import TokenLogprobs
from server.model.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas since its previous output)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    error_code: str | None = None  # machine-readable, e.g. "adapter_invalid"


@dataclass
class _Detok:
    stream: object  # tokenizers DecodeStream
    text: str = ""  # all output text so far (stop strings already cut off)
    emitted: int = 0  # characters of `text` already sent


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self._state: dict[str, _Detok] = {}

    def add(self, seq: Sequence) -> None:
        self._state[seq.request_id] = _Detok(self.tokenizer.stream(seq.request.prompt_token_ids))

    def remove(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def on_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        """Record `token` (already appended to `seq`) and decide whether `seq` finished."""
        p = seq.params
        st = self._state[seq.request_id]
        reason: FinishReason | None = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason = FinishReason.STOP
        else:
            piece = st.stream.step(self.tokenizer.backend, token)
            if piece:
                before = len(st.text)
                st.text += piece
                if p.stop and self._cut_at_stop(st, before, p.stop, p.include_stop_str_in_output):
                    reason = FinishReason.STOP
        if reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH

        # Hold back a possible stop-string prefix until it is known not to be one.
        hold = 0 if reason is not None or not p.stop else max(len(s) for s in p.stop) - 1
        end = max(st.emitted, len(st.text) - hold)
        delta, st.emitted = st.text[st.emitted:end], end
        return RequestOutput(
            request_id=seq.request_id, token_ids=[token], text=delta,
            logprobs=[logprobs] if logprobs is not None else [],
            finished=reason is not None, finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
        )

    @staticmethod
    def _cut_at_stop(st: _Detok, before: int, stops: tuple[str, ...], include: bool) -> bool:
        longest = max(len(s) for s in stops)
        search_from = max(0, before - longest + 1)
        hits = [(i, s) for s in stops if (i := st.text.find(s, search_from)) != -1]
        if not hits:
            return False
        i, s = min(hits)
        st.text = st.text[: i + len(s)] if include else st.text[:i]
        return True
