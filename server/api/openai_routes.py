"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

A handler turns the body into token ids and `SamplingParams`, validates everything
before anything is queued (so bad input is a 400, never a half-open stream), submits one
engine request per choice, and formats what comes back, streamed as SSE or whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from server.adapters.registry import AdapterRef
from server.api.admission import LeasedStream, admit, invalid_request, rate_limit_headers, refuse_if_full
from server.api.auth import tenant_of
from server.api.errors import bad_request, model_not_found
from server.api.openapi import error_responses, generation_responses
from server.api.responses import (
    ChoiceAccumulator,
    cached_tokens,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    sse,
    usage,
)
from server.api.response_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    new_id,
)
from server.api.running import Outputs, collect, stream_response, until_disconnect
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.api.service import Service
from server.engine.request import GenerationRequest, InvalidRequestError, Mixture, Route, SamplingParams
from server.model.tokenizer import ChatTemplateError
from server.tenants import Tenant

router = APIRouter()


def service(request: Request) -> Service:
    return request.app.state.service


@router.get("/v1/models", responses=error_responses(401))
async def list_models(svc: Service = Depends(service), tenant: Tenant = Depends(tenant_of)) -> ModelList:
    await svc.engine.refresh_adapters()  # a listing shows what the engine knows now (ranks, residency)
    return ModelList(data=svc.model_cards(tenant.name))


@router.get("/v1/models/{model:path}", responses=error_responses(401, 404))
async def retrieve_model(model: str, svc: Service = Depends(service), tenant: Tenant = Depends(tenant_of)) -> ModelCard:
    """One card of the listing (OpenAI's retrieve; `:path`, as a base model's name may hold a `/`);
    another tenant's adapter answers 404 exactly as a missing one."""
    await svc.engine.refresh_adapters()
    for card in svc.model_cards(tenant.name):
        if card.id == model:
            return card
    raise model_not_found(model)


@router.post("/v1/completions", responses=generation_responses(CompletionResponse, CompletionResponse))
async def create_completion(body: CompletionRequest, raw: Request, response: Response,
                            svc: Service = Depends(service),
                            tenant: Tenant = Depends(tenant_of)):
    choice = svc.resolve_choice(body, tenant.name)
    if body.echo and body.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported", "echo", "unsupported")
    refuse_if_full(raw, svc, tenant, _num_prompts(body.prompt) * body.n)
    prompts = await run_in_threadpool(_completion_prompts, svc, body.prompt)
    requests = _requests(svc, body, prompts, body.max_tokens, body.logprobs, choice, tenant)
    # decoded only once validated: a token id past the vocabulary is a 400, never a decode error
    prefix = await run_in_threadpool(_decode_all, svc, prompts) if body.echo else [""] * len(prompts)
    streams, headers = await _submit(raw, svc, tenant, requests)
    response.headers.update(headers)
    rid = new_id("cmpl")

    if body.stream:
        async def events(outputs: Outputs) -> AsyncIterator[str]:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            prompt_tokens = completion_tokens = 0
            cached = [0] * len(prompts)  # each prompt's, from its first choice (as prompt_tokens)
            offsets = [0] * len(streams)  # each choice's text_offset goes on from its last chunk
            async for index, out in outputs:
                if isinstance(out, str):
                    yield out
                    return
                text = out.text
                p_idx = index // body.n
                if index % body.n == 0:
                    cached[p_idx] = cached_tokens(cached[p_idx], out)
                if prefix[p_idx] and out.num_output_tokens == len(out.token_ids):  # first output
                    text = prefix[p_idx] + text
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(out.logprobs, svc.tokenizer.token_text, offsets[index])
                    if logprobs.tokens:
                        offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                chunk = CompletionResponse(id=rid, model=body.model, choices=[CompletionChoice(
                    index=index, text=text, finish_reason=finish_reason(out), logprobs=logprobs)])
                if out.finished:
                    if index % body.n == 0:  # a prompt counts once, whatever its number of choices
                        prompt_tokens += out.num_prompt_tokens
                    completion_tokens += out.num_output_tokens
                yield sse(chunk.model_dump())  # no `usage: null`: not nullable in CreateCompletionResponse
            if include_usage:
                total = usage(prompt_tokens, completion_tokens, sum(cached))
                yield sse(CompletionResponse(id=rid, model=body.model, choices=[], usage=total).model_dump())
            yield sse("[DONE]")

        return await stream_response(raw, streams, headers, events)

    acc = await collect(raw, streams)
    choices = [
        CompletionChoice(index=i, text=prefix[i // body.n] + a.text, finish_reason=a.finish_reason,
                         logprobs=completion_logprobs(a.logprobs, svc.tokenizer.token_text)
                         if body.logprobs is not None else None)
        for i, a in enumerate(acc)
    ]
    return CompletionResponse(id=rid, model=body.model, choices=choices, usage=_total_usage(acc, body.n))


@router.post("/v1/chat/completions",
             responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, raw: Request, response: Response,
                                 svc: Service = Depends(service),
                                 tenant: Tenant = Depends(tenant_of)):
    choice = svc.resolve_choice(body, tenant.name)
    refuse_if_full(raw, svc, tenant)
    messages = [_message(m) for m in body.messages]
    prompt = await run_in_threadpool(_chat_prompt, svc, messages, body.add_generation_prompt)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    # The engine names the completions fields; the client sent these.
    names = {"prompt": "messages", "max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None
             else "max_tokens"}
    requests = _requests(svc, body, [prompt], max_tokens, top, choice, tenant, names)
    streams, headers = await _submit(raw, svc, tenant, requests)
    response.headers.update(headers)
    rid = new_id("chatcmpl")

    if body.stream:
        async def events(outputs: Outputs) -> AsyncIterator[str]:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}
            for i in range(body.n):
                first = ChatCompletionChunk(id=rid, model=body.model, choices=[
                    ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                yield sse({**first.model_dump(), **extra})
            completion_tokens = cached = 0
            async for index, out in outputs:
                if isinstance(out, str):
                    yield out
                    return
                if index == 0:  # the one prompt counts once, from its first choice
                    cached = cached_tokens(cached, out)
                if not out.text and not out.finished and not (top is not None and out.logprobs):
                    continue  # nothing to say yet (text held back); a token's logprobs are never dropped
                chunk = ChatCompletionChunk(id=rid, model=body.model, choices=[ChatChunkChoice(
                    index=index, delta=DeltaMessage(content=out.text or None),
                    finish_reason=finish_reason(out),
                    logprobs=chat_logprobs(out.logprobs, svc.tokenizer) if top is not None else None)])
                if out.finished:
                    completion_tokens += out.num_output_tokens
                yield sse({**chunk.model_dump(), **extra})
            if include_usage:
                yield sse(ChatCompletionChunk(id=rid, model=body.model, choices=[],
                                              usage=usage(len(prompt), completion_tokens, cached)).model_dump())
            yield sse("[DONE]")

        return await stream_response(raw, streams, headers, events)

    acc = await collect(raw, streams)
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=a.text), finish_reason=a.finish_reason,
                   logprobs=chat_logprobs(a.logprobs, svc.tokenizer) if top is not None else None)
        for i, a in enumerate(acc)
    ]
    # One prompt however many choices: counted once, as when streamed and as OpenAI bills it.
    return ChatCompletionResponse(id=rid, model=body.model, choices=choices, usage=_total_usage(acc, body.n))


# --- building engine requests --------------------------------------------------------------


def _num_prompts(prompt) -> int:
    """Prompts in a completions `prompt`: a string or a list of token ids is one."""
    return 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)


def _completion_prompts(svc: Service, prompt) -> list[list[int]]:
    """Token ids of each prompt. CPU work: runs on a worker thread."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):  # one prompt as token ids (the schema refuses mixed or empty lists)
        return [list(prompt)]
    return [_encode(svc, p, "prompt") if isinstance(p, str) else list(p) for p in prompt]


def _decode_all(svc: Service, prompts: list[list[int]]) -> list[str]:
    """Each prompt's text, which its choices start with under `echo`. CPU work: a worker thread."""
    return [svc.tokenizer.decode(p) for p in prompts]


def _chat_prompt(svc: Service, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """The chat template rendered and tokenized (CPU work: runs on a worker thread)."""
    try:
        text = svc.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from exc
    except Exception as exc:  # the template's own code on a value the client sent (e.g. `|length` of a number)
        raise bad_request(f"the chat template failed on these messages ({type(exc).__name__})", "messages") from exc
    return _encode(svc, text, "messages", add_special_tokens=False)


def _encode(svc: Service, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    if len(text) > svc.tokenizer.max_chars(svc.max_model_len):  # cannot fit: skip the tokenizer's work
        raise bad_request(f"this model's maximum context length is {svc.max_model_len} tokens; the "
                          f"{param} ({len(text)} characters) is longer", param, "context_length_exceeded")
    return svc.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _message(m) -> dict:
    content = m.content
    if isinstance(content, list):  # text parts only (the schema refuses others)
        content = "".join(part["text"] for part in content)
    return {**(m.model_extra or {}), "role": m.role, "content": content or ""}


def _requests(svc: Service, body, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
              choice: AdapterRef | Mixture | Route | None, tenant: Tenant,
              names: dict[str, str] | None = None) -> list[GenerationRequest]:
    """One engine request per prompt per choice, validated (400 naming the field: `names` maps the
    engine's field names to the request's). Without `max_tokens` a generation may run to the end
    of the context, and no further than the tenant's tokens per minute allow (each of the
    request's generations an equal share): a request the quota could never admit otherwise."""
    adapter = choice if isinstance(choice, AdapterRef) else None
    experts = choice if isinstance(choice, (Mixture, Route)) else None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    rid = new_id("req")
    requests = []
    per_minute = tenant.limits.tokens_per_minute
    share = None if per_minute is None else int(per_minute) // (len(prompts) * body.n)
    for p_idx, prompt in enumerate(prompts):
        limit = max_tokens
        if limit is None:
            room = svc.max_model_len - len(prompt)
            limit = max(1, room if share is None else min(room, share - len(prompt)))
        params = SamplingParams(
            max_tokens=limit,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            seed=body.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            logprobs=logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output,
        )
        for i in range(body.n):
            choice_params = replace(params, seed=params.seed + i) if params.seed is not None and i else params
            requests.append(GenerationRequest(f"{rid}-{p_idx * body.n + i}", prompt, choice_params,
                                              adapter=adapter, tenant=tenant.name, experts=experts))
    try:
        for r in requests:
            svc.engine.validate(r)
    except InvalidRequestError as exc:
        error = invalid_request(exc)
        error.param = (names or {}).get(error.param, error.param)
        raise error from exc
    return requests


# --- running them ---------------------------------------------------------------------------


async def _submit(raw: Request, svc: Service, tenant: Tenant,
                  requests: list[GenerationRequest]) -> tuple[list[LeasedStream], dict[str, str]]:
    """Admit every choice's request, or none: the answer is still an HTTP status here.
    Returns the streams and the tenant's x-ratelimit-* headers for the answer."""
    streams, lease = await admit(raw, svc, tenant, requests, until_disconnect)
    return streams, rate_limit_headers(lease.state)


def _total_usage(acc: list[ChoiceAccumulator], n: int):
    firsts = acc[::n]  # a prompt counts once, whatever its number of choices
    return usage(sum(a.prompt_tokens for a in firsts), sum(a.completion_tokens for a in acc),
                 sum(a.cached_tokens for a in firsts))
