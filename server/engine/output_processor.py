"""The token level of the outputs: what one sampled token means for its sequence.

From token ids alone, on the engine's thread right after each step: EOS and stop token ids,
max_tokens and the context length decide whether a sequence finished. No tokenizer here: the
text (detokenisation, stop strings) is the text level's (server/engine/detokenizer.py), which
runs after this one in the engine's thread in-process and in the server process otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.request import FinishReason, Sequence
from server.engine.sampler import TokenLogprobs


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
    num_cached_tokens: int = 0  # of the prompt: found in the prefix cache (OpenAI's usage.prompt_tokens_details)
    num_output_tokens: int = 0
    error: str | None = None
    error_code: str | None = None  # machine-readable, e.g. "adapter_invalid"


def failed_output(request_id: str, exc: Exception, num_prompt_tokens: int, num_output_tokens: int) -> RequestOutput:
    """The last output of a request an internal error ended: its client is told only the
    exception's type (the log has the rest)."""
    return RequestOutput(request_id, finished=True, finish_reason=FinishReason.ERROR,
                         num_prompt_tokens=num_prompt_tokens, num_output_tokens=num_output_tokens,
                         error=f"internal error while running this request ({type(exc).__name__})",
                         error_code="internal_error")


class OutputProcessor:
    def __init__(self, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def on_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        """The output for `token` (already appended to `seq`), finished if it ends `seq`
        ("stop": an EOS or stop token id; "length": max_tokens or the context is full)."""
        p = seq.params
        reason: FinishReason | None = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = FinishReason.LENGTH
        return RequestOutput(
            request_id=seq.request_id, token_ids=[token],
            logprobs=[logprobs] if logprobs is not None else [],
            finished=reason is not None, finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_prompt_tokens,
        )
