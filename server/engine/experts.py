"""Engine-side rules of expert libraries (a request's mixture or route over adapters):
what can never run (limits, unknown or DoRA experts), and the host-side count of experts per
LoRA token for the metrics. No tensors, no I/O."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from server.adapters.registry import AdapterRef
from server.config import LoraConfig
from server.engine.request import GenerationRequest, InvalidRequestError, Mixture

FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32

if TYPE_CHECKING:
    from server.adapters.manager import AdapterManager
    from server.engine.scheduler import ScheduledChunk


def experts_param(request: GenerationRequest) -> str:
    """The API field that named the request's experts."""
    return "adapters" if isinstance(request.experts, Mixture) else "route.experts"


def expert_param(request: GenerationRequest, i: int) -> str:
    """The API field that named the request's expert `i` (as the server process names it)."""
    return f"adapters.{i}.id" if isinstance(request.experts, Mixture) else f"route.experts.{i}"


def validate_experts(request: GenerationRequest, lc: LoraConfig, adapters: AdapterManager | None) -> None:
    """Raise InvalidRequestError unless `request.experts` can run: within --max-mixture-experts /
    --max-route-experts, --max-mixture-rank and the step's adapter budget (a mixture runs only
    with all its experts in one step), every expert registered, none known to be DoRA, and the
    weights / top_k / temperature in range. Reads only state the HTTP thread may read."""
    experts = request.experts
    mixture = isinstance(experts, Mixture)
    param = experts_param(request)
    refs = experts.adapters
    if request.adapter is not None:
        raise InvalidRequestError("a request has one adapter or a mixture / route of experts, not both", param)
    if not refs:
        raise InvalidRequestError("a mixture or route needs at least one adapter", param)
    keys = [r.key if isinstance(r, AdapterRef) else (None, r) for r in refs]
    if len(set(keys)) != len(keys):
        raise InvalidRequestError("an adapter is named twice", param, "duplicate_adapter")
    limit = lc.max_mixture_experts if mixture else lc.max_route_experts
    if len(refs) > limit:
        flag = "--max-mixture-experts" if mixture else "--max-route-experts"
        raise InvalidRequestError(f"{len(refs)} experts; this server allows at most {limit} ({flag})", param,
                                  "too_many_experts")
    if adapters is None:
        raise not_found(refs[0], expert_param(request, 0))
    if len(refs) > adapters.step_capacity:
        raise InvalidRequestError(f"{len(refs)} experts; one step of this server holds at most "
                                  f"{adapters.step_capacity} adapters (--max-loras, --lora-pool-memory)", param,
                                  "too_many_experts")
    if mixture:
        if len(experts.weights) != len(refs):
            raise InvalidRequestError("each expert of a mixture needs one finite weight", param)
        for i, w in enumerate(experts.weights):
            # weights run as float32 (kernels/row_plan.py): a larger one would be inf there
            if not (_finite(w) and abs(w) <= FLOAT32_MAX):
                raise InvalidRequestError(f"a mixture weight must be finite and at most {FLOAT32_MAX:.4g} in "
                                          f"magnitude, got {w!r}", f"adapters.{i}.weight")
    else:
        if not isinstance(experts.top_k, int) or not 1 <= experts.top_k <= len(refs):
            raise InvalidRequestError(f"route.top_k must be in [1, {len(refs)}] (the number of experts), "
                                      f"got {experts.top_k!r}", "route.top_k")
        # run as float32: a smaller temperature would round to 0 (a 0/0 in the softmax)
        if not (_finite(experts.temperature) and FLOAT32_TINY <= experts.temperature <= FLOAT32_MAX):
            raise InvalidRequestError(f"route.temperature must be in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}], "
                                      f"got {experts.temperature!r}", "route.temperature")
    total_rank, unread = 0, False
    for i, (ref, key) in enumerate(zip(refs, keys)):
        entry = adapters.get(*key)
        if entry is None:  # e.g. unregistered since the server process resolved the name
            raise not_found(ref, expert_param(request, i))
        if entry.summary.use_dora:  # None until the adapter's files are read
            raise dora_in_mixture(ref, expert_param(request, i))
        unread |= entry.summary.rank is None
        total_rank += entry.summary.rank if entry.summary.rank is not None else lc.max_lora_rank
    # A replica of the registry (the server process's) may not know yet what the core has read:
    # a rank it counts at the slot rank is the core's to judge, at admission (still an HTTP status).
    if mixture and total_rank > lc.max_mixture_rank and not (unread and adapters.is_replica):
        raise InvalidRequestError(f"the mixture's total rank is {total_rank} (an adapter not read yet counts "
                                  f"--max-lora-rank {lc.max_lora_rank}); this server allows at most "
                                  f"{lc.max_mixture_rank} (--max-mixture-rank)", param, "too_many_experts")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def not_found(adapter: AdapterRef | str, param: str = "model") -> InvalidRequestError:
    name = adapter.name if isinstance(adapter, AdapterRef) else adapter
    return InvalidRequestError(f"The model `{name}` does not exist.", param, "model_not_found")


def dora_in_mixture(adapter: AdapterRef | str, param: str | None) -> InvalidRequestError:
    name = adapter.name if isinstance(adapter, AdapterRef) else adapter
    return InvalidRequestError(f"adapter `{name}` is a DoRA adapter: DoRA adapters run alone, not in a mixture "
                               "or route", param, "adapter_unsupported")


def experts_per_token(chunks: list[ScheduledChunk]) -> Counter[int]:
    """A step's LoRA tokens by how many experts each one uses: 1 for an adapter, k for a
    mixture of k, top_k for a route (host values only); base-only tokens are not counted."""
    counts: Counter[int] = Counter()
    for c in chunks:
        experts = c.seq.experts
        if experts is None:
            if c.seq.request.adapter is not None:
                counts[1] += c.num_tokens
        else:
            counts[len(experts.adapters) if isinstance(experts, Mixture) else experts.top_k] += c.num_tokens
    return counts
