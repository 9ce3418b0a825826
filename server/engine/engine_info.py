"""What an engine is (its fixed facts, which the server process also holds) and what can never
run on it: the checks both processes make before a request is queued."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from server.config import LoraConfig
from server.engine.experts import not_found, validate_experts
from server.engine.request import GenerationRequest, InvalidRequestError
from server.model.arch import ModelArch


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    model_dir: Path
    arch: ModelArch
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    num_blocks: int
    block_size: int


def validate_request(request: GenerationRequest, info: EngineInfo, lora: LoraConfig, adapters) -> None:
    """Raise InvalidRequestError for what can never run, from the engine's fixed facts (`info`),
    the LoRA limits and the adapters (the manager, or its replica in the server process when the
    engine runs in its own: server/engine/remote_adapters.py)."""
    request.params.validate()
    n = len(request.prompt_token_ids)
    max_len = info.max_model_len
    if n == 0:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if n + request.params.max_tokens > max_len:
        raise InvalidRequestError(
            f"this model's maximum context length is {max_len} tokens; the request has {n} prompt "
            f"tokens and max_tokens {request.params.max_tokens}", "max_tokens" if n < max_len else "prompt")
    vocab = info.arch.vocab_size
    if any(not 0 <= t < vocab for t in request.prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
    if request.adapter is not None and (adapters is None or not adapters.exists(request.adapter)):
        raise not_found(request.adapter)
    if request.experts is not None:
        validate_experts(request, lora, adapters)
