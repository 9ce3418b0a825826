"""The text level of the outputs: incremental detokenisation, stop strings, text deltas.

The engine's token level (server/engine/output_processor.py) decides what it can from token
ids alone (EOS, stop token ids, max_tokens, the context length); this class turns each
request's tokens into the text its client sees. One class for both engine modes:
- in-process (`--engine-process off`) the engine runs it on its thread right after the step,
  so a stop string frees the sequence before the next step;
- with the engine core in its own process, the server process runs it on each output as it
  arrives (server/engine/core_client.py), so the core never detokenises; a stop string found
  here finishes the request for the client and asks the core to retire it (which may already
  have run one more step for it: that output is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers.decoders import DecodeStream

from server.engine.output_processor import RequestOutput
from server.engine.request import FinishReason, SamplingParams
from server.model.tokenizer import Tokenizer


@dataclass
class _Text:
    stream: DecodeStream
    stop: tuple[str, ...]
    include_stop: bool
    hold: int  # characters held back while they may begin a stop string: longest stop - 1
    text: str = ""  # all output text so far (a stop string already cut off)
    emitted: int = 0  # characters of `text` already sent


class TextProcessor:
    """Per request: token ids in, text deltas out; stop strings found and cut."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._state: dict[str, _Text] = {}

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        hold = max((len(s) for s in params.stop), default=1) - 1
        self._state[request_id] = _Text(self.tokenizer.stream(prompt_token_ids), params.stop,
                                        params.include_stop_str_in_output, hold)

    def remove(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def clear(self) -> None:
        self._state.clear()

    def __len__(self) -> int:
        return len(self._state)

    def process(self, out: RequestOutput) -> bool:
        """Set `out.text` to the request's text delta since its previous output, decoding
        `out.token_ids` (as the token level made it: a finish_reason "stop" there means its last
        token is an EOS / stop token id, which is not text). True when a stop string finished
        the request here, where the token level had not: `out` is then finished ("stop") and
        cut after the token that completed the string (token ids, logprobs, output count), and
        the caller must retire the sequence. An output of a request not added, or an abort or
        error, passes as it is (held-back text is not flushed: the request did not complete)."""
        st = self._state.get(out.request_id)
        if st is None or out.finish_reason in (FinishReason.ABORT, FinishReason.ERROR):
            return False
        tokens = out.token_ids[:-1] if out.finish_reason is FinishReason.STOP else out.token_ids
        stopped_at = None
        backend = self.tokenizer.backend
        for i, token in enumerate(tokens):
            piece = st.stream.step(backend, token)
            if piece:
                before = len(st.text)
                st.text += piece
                if st.stop and self._cut_at_stop(st, before):
                    stopped_at = i
                    break
        newly_finished = stopped_at is not None and not out.finished
        if stopped_at is not None:
            dropped = len(out.token_ids) - stopped_at - 1
            if dropped:
                del out.token_ids[stopped_at + 1:]
                del out.logprobs[stopped_at + 1:]
                out.num_output_tokens -= dropped
            out.finished, out.finish_reason = True, FinishReason.STOP
        # Hold back a possible stop-string prefix until it is known not to be one.
        end = max(st.emitted, len(st.text) - (0 if out.finished else st.hold))
        out.text, st.emitted = st.text[st.emitted:end], end
        return newly_finished

    @staticmethod
    def _cut_at_stop(st: _Text, before: int) -> bool:
        """Find a stop string ending in the text added since `before`; cut the text there."""
        search_from = max(0, before - st.hold)
        hits = [(i, s) for s in st.stop if (i := st.text.find(s, search_from)) != -1]
        if not hits:
            return False
        i, s = min(hits)
        st.text = st.text[: i + len(s)] if st.include_stop else st.text[:i]
        return True
