"""Engine outputs -> OpenAI response objects and SSE streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from server.api.response_schemas import (
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from server.engine.output_processor import RequestOutput
from server.engine.sampler import TokenLogprobs
from server.model.tokenizer import Tokenizer

_DONE = object()


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (choice index, output). Closing the merged
    iterator closes every stream, which aborts their requests in the engine."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream) as s:
                async for out in s:
                    queue.put_nowait((index, out))
            queue.put_nowait((index, _DONE))
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ChoiceAccumulator:
    """Collects one choice's outputs for a non-streaming response."""

    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.logprobs.extend(out.logprobs)
        self.prompt_tokens = out.num_prompt_tokens
        self.cached_tokens = cached_tokens(self.cached_tokens, out)
        self.completion_tokens = out.num_output_tokens
        if out.finished:
            self.finish_reason = finish_reason(out)


def finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finish_reason is not None else None


def cached_tokens(so_far: int, out: RequestOutput) -> int:
    """A request's prompt tokens found in the prefix cache, given its value so far and its next
    output. Each output carries the same value, except outputs made where the engine's sequence
    is not at hand (a request's end found outside the engine's step: some carry 0)."""
    return max(so_far, out.num_cached_tokens)


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def completion_logprobs(items: list[TokenLogprobs], token_text: Callable[[int], str],
                        offset: int = 0) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for lp in items:
        text = token_text(lp.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(lp.logprob)
        result.top_logprobs.append({token_text(t): v for t, v in lp.top})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def chat_logprobs(items: list[TokenLogprobs], tokenizer: Tokenizer) -> ChatChoiceLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=tokenizer.token_text(token_id), logprob=logprob,
                          bytes=list(tokenizer.token_bytes(token_id)))

    content = []
    for lp in items:
        head = entry(lp.token_id, lp.logprob)
        content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=[entry(t, v) for t, v in lp.top]))
    return ChatChoiceLogprobs(content=content)


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"

